"""Does llama.cpp read an exported GGUF as the checkpoint it came from? Next-token logits and tokenization compared.

Usage: python benchmarks/gguf_llama_cpp.py [--types f32,f16,q8_0] [--steps 5] [--weight-std 0.3]

Needs llama-cpp-python (`pip install llama-cpp-python`: PyPI has it as source only, and it
compiles llama.cpp, 10 to 15 minutes on 2 cores: that is why this is a benchmark and not a test).
Builds a tiny grouped-query Llama checkpoint whose weights are drawn large (std 0.3, --weight-std)
so that attention is sharp and a wrong q/k layout shows, exports it per type, and runs it in llama.cpp
(CPU, float32 KV cache): at every position of STEPS probe texts, the next-token logits from
llama.cpp against the checkpoint's in transformers (float32). Prints the largest absolute logit difference, whether
every argmax agrees, and whether llama.cpp tokenizes the probe texts as the checkpoint's
tokenizer does; then one JSON line of those figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoints import write_checkpoint_files  # noqa: E402
from model.gguf_export import export_gguf  # noqa: E402
from model.presets import llama_config  # noqa: E402
from model.tokenizer import train_tokenizer  # noqa: E402

TEXTS = ["Bonjour à tous, le modèle apprend le français et l'anglais.", "Hello everyone, the model learns French.",
         "def add(x, y):\n    return x + y  # code too", "Où est la bibliothèque ? Elle est fermée le dimanche."] * 25
PROBES = ["Bonjour à tous, où est la bibliothèque ?", "  two spaces,\n\ttabs and a newline", "emoji 🐝 and digits 12345",
          "def add(x, y):\n    return x + y", "l'anglais n'est pas le français"]


def build_checkpoint(directory: Path, weight_std: float) -> Path:
    tokenizer = train_tokenizer(iter(TEXTS), vocab_size=400, out_dir=directory / "tokenizer")
    config = llama_config("tiny", len(tokenizer))
    config.num_key_value_heads = 2
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, weight_std)
    checkpoint = directory / "round-000001"
    checkpoint.mkdir()
    write_checkpoint_files(checkpoint, model, tokenizer, {
        "run_id": "llama-cpp-check", "completed_round": 1, "next_round": 2, "lineage_head": 0, "config_version": "v1",
        "run_config": {}, "saved_at": 0.0})
    return checkpoint


def without_extra_buffer_types() -> None:
    """Keep llama.cpp to its plain CPU kernels (llama_model_params.use_extra_bufts = false).

    Its AMX kernels (used for Q8_0 where the CPU lists amx_tile) die of SIGILL at `tilezero` on hosts
    that list AMX but do not grant its tile state to processes, as this project's machines do.
    llama-cpp-python does not expose the flag, so its default parameters are wrapped.
    """
    import llama_cpp.llama_cpp as api

    defaults = api.llama_model_default_params

    def plain_cpu():  # type: ignore[no-untyped-def]
        params = defaults()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = plain_cpu


def compare(checkpoint: Path, gguf_path: Path, steps: int) -> dict:
    from llama_cpp import GGML_TYPE_F32, Llama

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    # A float32 KV cache (llama.cpp's default is float16), so that the figures measure the file, not the cache.
    llama = Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, n_threads=2, verbose=False, seed=0,
                  type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    worst, agree, total = 0.0, 0, 0
    for text in PROBES[:steps]:
        ids = tokenizer(text).input_ids
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].numpy()
        llama.reset()
        llama.eval(ids)
        got = np.asarray(llama.scores[: len(ids)], dtype=np.float32)
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(ids)
    same_tokens = all(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tokenizer(text).input_ids
                      for text in PROBES)
    return {"max_abs_logit_difference": worst, "argmax_agree": agree, "positions": total, "same_tokenization": same_tokens,
            "logit_range": float(np.ptp(expected))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="f32,f16,q8_0")
    parser.add_argument("--steps", type=int, default=len(PROBES), help="how many probe texts to score")
    parser.add_argument("--weight-std", type=float, default=0.3,
                        help="std of the random matrices (0.3: sharp attention; 0.02: as models are initialised)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python (it compiles llama.cpp)")
    without_extra_buffer_types()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="essaim-gguf-llama-cpp-") as scratch:
        checkpoint = build_checkpoint(Path(scratch), args.weight_std)
        for name in args.types.split(","):
            out = export_gguf(checkpoint, Path(scratch) / name / "model.gguf", name).gguf
            rows[name] = compare(checkpoint, out, args.steps)
    print(f"llama-cpp-python {llama_cpp.__version__}; tiny GQA Llama, weights std {args.weight_std}, {args.steps} probe "
          "texts, every position scored")
    print(f"\n{'type':<6} {'max |logit diff|':>17} {'argmax agree':>13} {'same tokens':>12}")
    for name, row in rows.items():
        print(f"{name:<6} {row['max_abs_logit_difference']:>17.5f} {row['argmax_agree']:>6}/{row['positions']:<6} "
              f"{str(row['same_tokenization']):>12}")
    print(f"(logits span about {next(iter(rows.values()))['logit_range']:.1f} at a position)")
    print(json.dumps({"benchmark": "gguf_llama_cpp", "llama_cpp_python": llama_cpp.__version__, "weight_std": args.weight_std,
                      **{f"{name}_max_abs_logit_difference": round(row["max_abs_logit_difference"], 6)
                         for name, row in rows.items()},
                      **{f"{name}_argmax_agree": row["argmax_agree"] == row["positions"] for name, row in rows.items()},
                      "same_tokenization": all(row["same_tokenization"] for row in rows.values())}))


if __name__ == "__main__":
    main()
