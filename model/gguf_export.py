"""A checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile beside it.

The file follows llama.cpp's own converter (convert_hf_to_gguf.py, written with its
`gguf` package): architecture "llama", its tensor names, q and k rows permuted from
Hugging Face's rotary layout (halves) to GGML's (interleaved pairs), a tied output
left out (llama.cpp then reads token_embd), norms kept in float32, and the byte-level
BPE as a "gpt2" vocabulary with the GPT-2 pre-tokenizer, which is the split Essaim's
tokenizer uses. Tensors are converted and written one at a time, so a 1 B model needs
about one tensor's memory; the file is written under a temporary name and renamed
when complete, and the weights are checked against the digest the checkpoint records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from model.checkpoints import CheckpointError, latest_checkpoint
from model.gguf_vocab import Vocabulary, read_vocabulary
from model.instructions import PROMPT

FINETUNE_RECORD = "finetune.json"  # coordinator.finetune_lineage's record, beside a merged model
MODELFILE = "Modelfile"

# --type -> (what 2-D weights become, the file type llama.cpp reports); 1-D norms stay float32.
TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


class ExportError(ValueError):
    """A checkpoint or an output that cannot be exported; the message says what was found and what to do."""


@dataclass
class ExportSource:
    """What goes into the file: the model's directory and config, its tensors in Hugging Face names, its provenance."""

    directory: Path                                    # config.json and the tokenizer
    config: dict
    tensors: dict[str, Callable[[], torch.Tensor]]     # HF name -> loader, in the model's parameter order
    shapes: dict[str, tuple[int, ...]]
    name: str
    finetuned: bool
    expected_digest: str | None = None                 # checkpoint.json's params digest, checked while writing
    provenance: dict[str, str] = field(default_factory=dict)
    licence: str | None = None
    data_licences: list[str] = field(default_factory=list)
    origin: Path | None = None                         # what was exported: a checkpoint, a merged model, an adapter


@dataclass(frozen=True)
class ExportResult:
    gguf: Path
    modelfile: Path
    type: str
    tensors: int
    bytes: int
    source: Path
    name: str  # the model's name in the file (general.name), and a name for `ollama create`


def export_gguf(checkpoint: Path, out: Path, type_name: str = "f16", force: bool = False) -> ExportResult:
    """Write CHECKPOINT as a GGUF at `out` and a Modelfile beside it; both whole or neither touched."""
    if type_name.lower() not in TYPES:
        raise ExportError(f"unsupported --type {type_name!r}: choose one of {', '.join(TYPES)}")
    type_name = type_name.lower()
    out = Path(out)
    modelfile = out.parent / MODELFILE
    if out.is_dir():
        raise ExportError(f"{out} is a directory: give the path of the .gguf file to write, e.g. {out / 'model.gguf'}")
    for existing in (out, modelfile):
        if existing.exists() and not force:
            raise ExportError(f"{existing} exists: choose another --out, or pass --force to replace it")
    with open_source(Path(checkpoint)) as source:
        try:
            vocabulary = read_vocabulary(source.directory, int(source.config["vocab_size"]))
        except ValueError as error:
            raise ExportError(str(error)) from None
        out.parent.mkdir(parents=True, exist_ok=True)
        partial_gguf = out.with_name(f".{out.name}.partial-{os.getpid()}")
        partial_modelfile = modelfile.with_name(f".{modelfile.name}.partial-{os.getpid()}")
        try:
            count = _write_gguf(source, vocabulary, type_name, partial_gguf)
            partial_modelfile.write_text(modelfile_text(source, vocabulary, out.name), encoding="utf-8")
            os.replace(partial_gguf, out)
            os.replace(partial_modelfile, modelfile)
        finally:
            partial_gguf.unlink(missing_ok=True)
            partial_modelfile.unlink(missing_ok=True)
    return ExportResult(out, modelfile, type_name, count, out.stat().st_size, source.origin or source.directory,
                        source.name.lower())


@contextlib.contextmanager
def open_source(path: Path) -> Iterator[ExportSource]:
    """The model a path names: a checkpoint, a checkpoint DIR holding 'latest', a fine-tune's output or its adapter."""
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory; give a checkpoint (round-NNNNNN, or the DIR holding 'latest'), "
                          "a fine-tune's --out directory, or its merged/ or adapter/")
    try:
        path = latest_checkpoint(path) or path
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    if (path / FINETUNE_RECORD).is_file() and not (path / "config.json").is_file():
        # a fine-tune's --out: its merged model, else its adapter merged here
        path = path / "merged" if (path / "merged" / "config.json").is_file() else path / "adapter"
    if (path / "adapter_config.json").is_file():
        source = _merged_adapter(path)
        source.origin = path
        yield source
        return
    config = _llama_config(path)
    with contextlib.ExitStack() as files:
        tensors, shapes = _safetensors(path, config, files)
        yield _describe(ExportSource(path, config, tensors, shapes, name=path.name, finetuned=False))


def _llama_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        found = (", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing") if path.is_dir() else "no such directory"
        raise ExportError(f"{path}: no config.json, so not a Hugging Face checkpoint (found: {found}); give a checkpoint "
                          "directory written by an Essaim worker, or a fine-tune's merged/ directory")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type != "llama" or "LlamaForCausalLM" not in architectures:
        raise ExportError(f"{path}: found a {model_type!r} model ({', '.join(architectures) or 'no architectures'}); "
                          "export writes Llama checkpoints (model_type 'llama', LlamaForCausalLM) as Essaim trains them")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"{path}: rope type {rope['rope_type']!r} is not exported; only the default rotary embedding is")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ExportError(f"{path}: a Llama with biases (attention_bias/mlp_bias) is not exported; Essaim's presets have none")
    return config


def _parameter_names(config: dict) -> list[str]:
    """The model's parameters in its own order (the order of checkpoint digests), a tied output counted once."""
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
    return [name for name, _ in model.named_parameters()]


def _safetensors(path: Path, config: dict, files: contextlib.ExitStack):  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        weight_map = None
    else:
        raise ExportError(f"{path}: no model.safetensors; the checkpoint's weights are missing")
    parts: dict[str, object] = {}

    def part(file_name: str):  # type: ignore[no-untyped-def]
        if file_name not in parts:
            parts[file_name] = files.enter_context(safe_open(path / file_name, framework="pt"))
        return parts[file_name]

    stored = {name: (weight_map or {}).get(name, "model.safetensors")
              for name in (weight_map or part("model.safetensors").keys())}
    expected = _parameter_names(config)
    missing = [name for name in expected if name not in stored]
    unexpected = sorted(set(stored) - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        raise ExportError(f"{path}: not the tensors of this config's Llama (missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}); the checkpoint is incomplete or not an Essaim Llama")
    tensors = {name: (lambda name=name: part(stored[name]).get_tensor(name)) for name in expected}
    shapes = {name: tuple(part(stored[name]).get_slice(name).get_shape()) for name in expected}
    return tensors, shapes


def _describe(source: ExportSource) -> ExportSource:
    """Name, provenance and licences from what Essaim writes beside the weights."""
    directory = source.directory
    info = _json(directory / "checkpoint.json")
    record = _json(directory / FINETUNE_RECORD)
    if info:
        source.name = f"essaim-{info['run_id']}-round-{info['completed_round']}"
        source.expected_digest = info.get("params_digest")
        source.provenance = {"essaim.run_id": str(info["run_id"]), "essaim.completed_round": str(info["completed_round"]),
                             "essaim.params_digest": str(info.get("params_digest", ""))}
    if record:
        source.finetuned = True
        source.name, source.provenance = _finetune_identity(record)
    card = _json(directory / "model_card.json") or {}
    data_licences = card.get("tokens_by_licence") or (card.get("base_card") or {}).get("tokens_by_licence") or {}
    source.data_licences = sorted(data_licences)
    base_dir = Path(record["base"]["path"]) if record else None
    source.licence = _licence(directory) or (_licence(base_dir) if base_dir and base_dir.is_dir() else None)
    return source


def _merged_adapter(adapter: Path) -> ExportSource:
    """A LoRA adapter merged into the base checkpoint it names (peft's merge_and_unload), in memory."""
    from peft import PeftModel

    from model.checkpoints import load_model, read_checkpoint

    base_path = Path(json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
    if not (base_path / "config.json").is_file():
        raise ExportError(f"{adapter}: a LoRA adapter whose base checkpoint {str(base_path)!r} is not here; "
                          "export the fine-tune's merged/ directory, or restore the base checkpoint at that path")
    config = _llama_config(base_path)
    try:
        base = load_model(read_checkpoint(base_path)) if (base_path / "checkpoint.json").is_file() else None
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    if base is None:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    parameters = dict(merged.named_parameters())
    source = ExportSource(base_path, config, {name: (lambda p=p: p.detach()) for name, p in parameters.items()},
                          {name: tuple(p.shape) for name, p in parameters.items()}, name=base_path.name, finetuned=True)
    source = _describe(source)  # the base's name, provenance and licences
    source.finetuned, source.expected_digest = True, None  # new weights; the base's digest was checked on loading
    record = _json(adapter.parent / FINETUNE_RECORD)  # present when the adapter is a fine-tune's own output
    if record:
        source.name, source.provenance = _finetune_identity(record)
    else:
        source.name = f"{source.name}-{adapter.parent.name}-finetune"
        source.provenance = {key.replace("params_digest", "base_params_digest"): value
                             for key, value in source.provenance.items()}
    return source


def _finetune_identity(record: dict) -> tuple[str, dict[str, str]]:
    """A fine-tuned model's name and provenance, from its record: the base checkpoint and the adapter."""
    base = record["base"]
    return f"essaim-{base['run_id']}-round-{base['completed_round']}-finetune", {
        "essaim.run_id": str(base["run_id"]), "essaim.completed_round": str(base["completed_round"]),
        "essaim.base_params_digest": str(base["params_digest"]), "essaim.adapter_sha256": str(record["adapter"]["sha256"]),
    }


def _write_gguf(source: ExportSource, vocabulary: Vocabulary, type_name: str, path: Path) -> int:
    weight_type, file_type = TYPES[type_name]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_metadata(writer, source, file_type)
    vocabulary.add_to(writer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(source.config["num_hidden_layers"]))
    plan = []
    for hf_name, shape in source.shapes.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ExportError(f"{source.directory}: tensor {hf_name} has no llama.cpp name; not an Essaim Llama")
        # As llama.cpp: norms in float32; a row that Q8_0 blocks do not divide falls back to float16.
        qtype = weight_type if len(shape) > 1 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16
        plan.append((hf_name, gguf_name, shape, qtype))
        _add_tensor_info(writer, gguf_name, shape, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    digest = hashlib.sha256()
    try:
        for hf_name, _, _, qtype in plan:
            tensor = source.tensors[hf_name]()
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            writer.write_tensor_data(_convert(tensor, hf_name, source.config, qtype))
    finally:
        writer.close()
    if source.expected_digest and digest.hexdigest() != source.expected_digest:
        raise ExportError(f"{source.directory}: the weights do not match the digest recorded in checkpoint.json "
                          "(modified or corrupted files); export another checkpoint or fetch this one again")
    return len(plan)


def _add_metadata(writer: gguf.GGUFWriter, source: ExportSource, file_type: gguf.LlamaFileType) -> None:
    config = source.config
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    rope = config.get("rope_parameters") or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.name)
    if source.licence:
        writer.add_license(source.licence.splitlines()[0][:200])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in source.provenance.items():
        writer.add_string(key, value)


def _add_tensor_info(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def _convert(tensor: torch.Tensor, hf_name: str, config: dict, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    weights = tensor.to(torch.float32)
    heads = config["num_attention_heads"]
    if hf_name.endswith("self_attn.q_proj.weight"):
        weights = permute_rotary(weights, heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
        weights = permute_rotary(weights, config.get("num_key_value_heads") or heads)
    return gguf.quants.quantize(weights.contiguous().numpy(), qtype)


def permute_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows from Hugging Face's rotary layout (first half, second half) to GGML's (interleaved pairs).

    The same as llama.cpp's LlamaModel.permute; transformers' GGUF loader applies the inverse.
    """
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def modelfile_text(source: ExportSource, vocabulary: Vocabulary, gguf_name: str) -> str:
    """Ollama's recipe: the file, how prompts are laid out for this model, where it stops, its context and licence."""
    if source.finetuned:  # the fine-tune's layout (model.instructions.PROMPT), after the BOS it trained with
        template = vocabulary.bos_text + PROMPT.format(instruction="{{ .Prompt }}")
    else:  # a pretrained model continues text
        template = "{{ .Prompt }}"
    lines = [f"# Ollama Modelfile for {source.name}, written by `essaim export gguf` from {source.directory}",
             *(f"# {key}: {value}" for key, value in source.provenance.items()),
             f"# Use: ollama create {source.name.lower()} -f {MODELFILE}",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""']
    if vocabulary.eos_text:
        lines.append(f'PARAMETER stop "{vocabulary.eos_text}"')
    lines.append(f"PARAMETER num_ctx {source.config['max_position_embeddings']}")
    if source.data_licences:
        lines.append(f"# Training data licences (model_card.json): {', '.join(source.data_licences)}")
    if source.licence:
        lines.append(f'LICENSE """{source.licence.strip()}"""')
    else:
        lines.append("# The checkpoint states no licence (no LICENSE file or README licence): add a LICENSE line before sharing.")
    return "\n".join(lines) + "\n"


def _licence(directory: Path) -> str | None:
    """A LICENSE file's text, or the `license:` of a Hugging Face README's front matter."""
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (directory / name).is_file():
            return (directory / name).read_text(encoding="utf-8")
    readme = directory / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                if line.strip().startswith("license:"):
                    return line.split(":", 1)[1].strip().strip("'\"") or None
    return None


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
