"""GGUF export: the file transformers' GGUF loader reads back is the checkpoint (weights, greedy tokens, tokenizer).

The test model is a tiny Llama with grouped-query attention whose weights are drawn
large enough (std 0.3) that attention is sharp: a q/k permutation left out or done
wrong changes its greedy tokens, which the first test shows before relying on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from coordinator.finetune_config import FinetuneSettings
from coordinator.finetune_lineage import base_adapter, write_outputs
from model.checkpoints import LATEST, write_checkpoint_files
from model.gguf_export import MODELFILE, ExportError, export_gguf, permute_rotary
from model.presets import llama_config
from model.tokenizer import train_tokenizer

TEXTS = [
    "Bonjour à tous, le modèle apprend le français et l'anglais.",
    "Hello everyone, the model learns French and English.",
    "def add(x, y):\n    return x + y  # code too",
    "Où est la bibliothèque ? Elle est fermée le dimanche.",
] * 25
PROBES = ["Bonjour à tous, où est la bibliothèque ?", "  two spaces,\n\ttabs and a newline", "emoji 🐝 and </s> text",
          "def add(x, y):\n    return x + y"]
PROMPT = "Bonjour à tous, le modèle"
NEW_TOKENS = 16


def _checkpoint(directory: Path, tied: bool = True) -> Path:
    """DIR/round-000003 (a tiny GQA Llama, as an Essaim worker writes it) and DIR/latest naming it."""
    tokenizer = train_tokenizer(iter(TEXTS), vocab_size=400, out_dir=directory / "tokenizer")
    config = llama_config("tiny", len(tokenizer))
    config.num_key_value_heads, config.tie_word_embeddings = 2, tied
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500_000.0}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    round_dir = directory / "round-000003"
    round_dir.mkdir(parents=True)
    write_checkpoint_files(round_dir, model, tokenizer, {
        "run_id": "gguf-test", "completed_round": 3, "next_round": 4, "lineage_head": 0, "config_version": "v1",
        "run_config": {"model_preset": "tiny"}, "saved_at": 0.0})
    (directory / LATEST).write_text(round_dir.name)
    return round_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("run"))


def _greedy(model: torch.nn.Module, tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)[0, ids.shape[1]:].tolist()


def _load_gguf(path: Path):  # type: ignore[no-untyped-def]
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def _load(directory: Path):  # type: ignore[no-untyped-def]
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_the_test_model_is_sensitive_to_the_rotary_permutation(checkpoint: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = _load(checkpoint)
    reference = _greedy(model, tokenizer)
    with torch.no_grad():  # what a loader would run if the file's q/k rows were left in the wrong layout
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.copy_(permute_rotary(layer.self_attn.q_proj.weight, 4))
            layer.self_attn.k_proj.weight.copy_(permute_rotary(layer.self_attn.k_proj.weight, 2))
    assert _greedy(model, tokenizer) != reference


@pytest.mark.parametrize("type_name", ["f32", "f16"])
def test_gguf_gives_the_checkpoints_greedy_tokens(checkpoint: Path, tmp_path: Path, type_name: str) -> None:
    out = tmp_path / "model.gguf"
    result = export_gguf(checkpoint.parent, out, type_name)  # the DIR holding 'latest'
    assert result.gguf == out and result.source == checkpoint and out.stat().st_size == result.bytes
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    reference, exported = _load(checkpoint), _load_gguf(out)
    assert exported.config.num_key_value_heads == 2 and exported.config.tie_word_embeddings
    assert _greedy(exported, tokenizer) == _greedy(reference, tokenizer)
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        difference = (exported(ids).logits - reference(ids).logits).abs().max().item()
    assert difference < (1e-4 if type_name == "f32" else 0.05)


def test_untied_output_is_written_and_read_back(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path / "run", tied=False)
    out = export_gguf(checkpoint, tmp_path / "out" / "model.gguf", "f32").gguf
    assert "output.weight" in {tensor.name for tensor in gguf.GGUFReader(out).tensors}
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    exported, reference = _load_gguf(out), _load(checkpoint)
    assert not exported.config.tie_word_embeddings
    assert torch.equal(exported.lm_head.weight, reference.lm_head.weight)
    assert _greedy(exported, tokenizer) == _greedy(reference, tokenizer)


def test_gguf_tokenizer_encodes_and_decodes_as_the_checkpoints(checkpoint: Path, tmp_path: Path) -> None:
    out = export_gguf(checkpoint, tmp_path / "model.gguf", "f16").gguf
    original = transformers.AutoTokenizer.from_pretrained(checkpoint)
    from_gguf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in PROBES:
        ids = original(text).input_ids
        assert from_gguf(text).input_ids == ids, text
        assert from_gguf.decode(ids) == text
    assert (from_gguf.bos_token_id, from_gguf.eos_token_id, from_gguf.pad_token_id) == (1, 2, 0)


def test_metadata_names_and_types_follow_llama_cpp(checkpoint: Path, tmp_path: Path) -> None:
    out = export_gguf(checkpoint, tmp_path / "model.gguf", "q8_0").gguf
    reader = gguf.GGUFReader(out)

    def value(key: str):  # type: ignore[no-untyped-def]
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama" and value("general.name") == "essaim-gguf-test-round-3"
    assert (value("llama.block_count"), value("llama.embedding_length"), value("llama.feed_forward_length")) == (2, 64, 172)
    assert (value("llama.attention.head_count"), value("llama.attention.head_count_kv")) == (4, 2)
    assert value("llama.context_length") == 256 and value("llama.rope.freq_base") == 500_000.0
    assert value("llama.rope.dimension_count") == 16 and value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (value("tokenizer.ggml.model"), value("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert value("tokenizer.ggml.add_bos_token") is False  # Essaim's tokenizer adds no BOS to text
    assert value("tokenizer.ggml.token_type")[:5] == [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL]
    assert value("essaim.params_digest") == json.loads((checkpoint / "checkpoint.json").read_text())["params_digest"]
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reads token_embd for the output
    assert set(types) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{block}.{name}.weight" for block in range(2) for name in
        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    # 172 columns are not a whole number of 32-value Q8_0 blocks: llama.cpp's converter falls back to F16 there.
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("type_name", ["bf16", "q8_0"])
def test_quantised_weights_read_back_as_the_checkpoints_rounded(checkpoint: Path, tmp_path: Path, type_name: str) -> None:
    """Every weight transformers reads back equals the checkpoint's quantised and dequantised by gguf-py (exactly)."""
    out = export_gguf(checkpoint, tmp_path / "model.gguf", type_name).gguf
    qtype = gguf.GGMLQuantizationType.BF16 if type_name == "bf16" else gguf.GGMLQuantizationType.Q8_0
    exported, reference = _load_gguf(out).state_dict(), _load(checkpoint).state_dict()
    for name, weight in reference.items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        expected = weight.numpy()
        if weight.dim() == 2 and not (qtype == gguf.GGMLQuantizationType.Q8_0 and weight.shape[1] % 32):
            expected = gguf.quants.dequantize(gguf.quants.quantize(expected, qtype), qtype)
        elif weight.dim() == 2:
            expected = expected.astype(np.float16).astype(np.float32)
        assert np.array_equal(exported[name].numpy(), expected), name


def test_finetune_output_exports_merged_model_and_adapter_alike(checkpoint: Path, tmp_path: Path) -> None:
    settings = FinetuneSettings(checkpoint=checkpoint, out=tmp_path / "tune", rounds=1)
    base, model, arrays = base_adapter(settings)
    generator = np.random.default_rng(0)
    tuned = [generator.normal(0.0, 0.2, array.shape).astype(np.float32) for array in arrays]  # lora_B != 0
    write_outputs(settings, base, model, tuned, rounds=[], evaluation={}, site_privacy={}, flower_run_id=1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    merged_tokens = _greedy(_load(settings.out / "merged"), tokenizer)
    assert merged_tokens != _greedy(_load(checkpoint), tokenizer)  # the adapter changed the model

    from_out = export_gguf(settings.out, tmp_path / "a" / "model.gguf", "f32")  # the fine-tune's --out: merged/
    assert from_out.source == settings.out / "merged"
    from_adapter = export_gguf(settings.out / "adapter", tmp_path / "b" / "model.gguf", "f32")  # merged here
    assert from_adapter.source == settings.out / "adapter"
    for result in (from_out, from_adapter):
        assert _greedy(_load_gguf(result.gguf), tokenizer) == merged_tokens
        modelfile = result.modelfile.read_text()
        assert 'TEMPLATE """<s>### Question:\n{{ .Prompt }}\n### Answer:\n"""' in modelfile
        assert "essaim.adapter_sha256" in modelfile and "-finetune" in modelfile


def test_modelfile_beside_the_gguf(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "LICENSE").write_text("Apache-2.0\n\nThe weights of this run are open.\n")
    try:
        result = export_gguf(checkpoint, tmp_path / "lucie.gguf", "f16")
    finally:
        (checkpoint / "LICENSE").unlink()
    text = (tmp_path / MODELFILE).read_text()
    assert result.modelfile == tmp_path / MODELFILE
    assert "FROM ./lucie.gguf\n" in text and 'TEMPLATE """{{ .Prompt }}"""' in text
    assert 'PARAMETER stop "</s>"' in text and "PARAMETER num_ctx 256" in text
    assert 'LICENSE """Apache-2.0\n\nThe weights of this run are open."""' in text
    assert gguf.GGUFReader(result.gguf).fields["general.license"].contents() == "Apache-2.0"


def test_unsupported_type_is_refused_listing_the_supported(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"unsupported --type 'q4_k': choose one of f32, f16, bf16, q8_0"):
        export_gguf(checkpoint, tmp_path / "model.gguf", "q4_k")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_forced(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone's file")
    with pytest.raises(ExportError, match="model.gguf exists: choose another --out, or pass --force"):
        export_gguf(checkpoint, out, "f16")
    assert out.read_bytes() == b"someone's file" and not (tmp_path / MODELFILE).exists()
    out.unlink()
    (tmp_path / MODELFILE).write_text("FROM elsewhere\n")
    with pytest.raises(ExportError, match="Modelfile exists"):
        export_gguf(checkpoint, out, "f16")
    assert not out.exists()
    export_gguf(checkpoint, out, "f16", force=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    assert (tmp_path / MODELFILE).read_text().startswith("# Ollama Modelfile")


def test_not_a_llama_checkpoint_is_refused_saying_what_was_found(checkpoint: Path, tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    with pytest.raises(ExportError, match=r"found a 'gpt2' model \(GPT2LMHeadModel\); export writes Llama checkpoints"):
        export_gguf(gpt2, tmp_path / "out" / "model.gguf")
    with pytest.raises(ExportError, match=r"no config.json, so not a Hugging Face checkpoint \(found: tokenizer.json"):
        export_gguf(checkpoint.parent / "tokenizer", tmp_path / "out" / "model.gguf")
    with pytest.raises(ExportError, match="no such directory"):
        export_gguf(tmp_path / "missing", tmp_path / "out" / "model.gguf")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_corrupted_weights_leave_nothing_behind(checkpoint: Path, tmp_path: Path) -> None:
    """Weights that no longer hash to checkpoint.json's digest: refused once written, and no file is left."""
    copy = tmp_path / "round-000003"
    copy.mkdir()
    for file in checkpoint.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    tensors["model.norm.weight"][0] += 1.0
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(ExportError, match="do not match the digest recorded in checkpoint.json"):
        export_gguf(copy, out, "f16")
    assert list(out.parent.iterdir()) == []
