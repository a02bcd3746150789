"""Llama-style architecture presets, from a test-sized model to the Lucie-7B shape.

A preset is plain data so a run's genesis document can name it and every worker
builds the same architecture; ``build_model`` adds a seed so they also start from
the same weights without shipping them.
"""

from __future__ import annotations

import torch
import transformers

from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

# LlamaConfig keyword arguments per preset. The vocabulary size is not part of a
# preset: it comes from the run's tokenizer (``llama_config(preset, vocab_size)``).
PRESETS: dict[str, dict] = {
    # Tests and the loopback demo: ~0.1 M parameters besides the embedding.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=172,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    # A model a volunteer's GPU (or a patient CPU) trains for real: ~22 M
    # non-embedding parameters, grouped-query attention like Lucie.
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1376,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # GPT-3 Small's size as a Llama: 75.5 M non-embedding parameters, 125.5 M in all with
    # the 65,024-token Lucie vocabulary; a consumer GPU trains it for real.
    "125m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    # A Lucie-1B-like Llama: 0.97 G non-embedding parameters, 1.11 G in all with the
    # 65,024-token vocabulary (tied embeddings). 17.7 GB of weights, gradients and
    # AdamW state in float32, plus activations: a datacentre GPU's model.
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        max_position_embeddings=2048,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
    ),
    # The shape of OpenLLM-France's Lucie-7B (its tokenizer has 65024 tokens).
    # Only ever configured in tests, never built: it needs ~27 GiB in float32.
    "lucie-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=12288,
        max_position_embeddings=4096,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
    ),
}

LUCIE_VOCAB_SIZE = 65024


def llama_config(preset: str, vocab_size: int) -> transformers.LlamaConfig:
    """The ``LlamaConfig`` of ``preset`` with a vocabulary of ``vocab_size`` tokens.

    Special token ids follow ``model.tokenizer.SPECIAL_TOKENS`` so that generation
    and padding agree with the tokenizers Essaim trains.
    """
    if preset not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown model preset {preset!r}: choose one of {known}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must leave room for the special tokens, got {vocab_size}; "
            "use the size of the run's tokenizer"
        )
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation="sdpa",  # PyTorch's fused attention (flash or memory-efficient on CUDA)
        **PRESETS[preset],
    )


def parameter_count(preset: str, vocab_size: int) -> int:
    """Trainable parameters of the preset's model (tied embeddings counted once), without building it."""
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(preset, vocab_size))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(preset: str, vocab_size: int, seed: int) -> transformers.LlamaForCausalLM:
    """A freshly initialised float32 model, identical for the same arguments in any process.

    Initialisation draws from torch's global generator, which we seed inside
    ``fork_rng`` so the caller's random state (CPU and GPU) is left as it was.
    """
    config = llama_config(preset, vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.to(torch.float32)
