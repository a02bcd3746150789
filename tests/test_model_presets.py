"""Model presets: deterministic builds, the Lucie-7B shape, a usable forward pass."""

import math

import pytest
import torch

from model.presets import PRESETS, build_model, llama_config


def test_same_seed_builds_identical_parameters_and_another_seed_differs():
    a = build_model("tiny", vocab_size=300, seed=7).state_dict()
    b = build_model("tiny", vocab_size=300, seed=7).state_dict()
    c = build_model("tiny", vocab_size=300, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in a.values())


def test_build_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("tiny", vocab_size=300, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_lucie_7b_config_has_the_lucie_shape():
    config = llama_config("lucie-7b", vocab_size=65024)
    assert (config.hidden_size, config.num_hidden_layers) == (4096, 32)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    assert config.intermediate_size == 12288
    assert config.vocab_size == 65024
    assert config.max_position_embeddings == 4096
    # transformers 5 moved rope_theta into rope_parameters.
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 500_000
    assert config.tie_word_embeddings is False


def test_unknown_preset_error_lists_the_known_presets():
    with pytest.raises(ValueError) as excinfo:
        llama_config("huge", vocab_size=1000)
    for name in PRESETS:
        assert name in str(excinfo.value)


def test_forward_pass_with_labels_gives_a_finite_loss_near_uniform():
    vocab_size = 300
    model = build_model("tiny", vocab_size=vocab_size, seed=0)
    ids = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(loss.item())
    # A fresh model predicts near-uniformly: loss close to log(vocab).
    assert abs(loss.item() - math.log(vocab_size)) < 1.0
