"""The top-k + 2-bit codec and the sparse reply codec (worker/sparse_codec.py), on their own."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import CompressionInfo, Float16Compression

from coordinator.config import RunSettings
from governance.documents import GovernanceError
from governance.state import check_config
from protocol import choices
from worker.allreduce import COMPRESSIONS
from worker.sparse_codec import CHUNK, SparseCodecError, SparseScaledHalf, TopK2Bit, decode_part, kept_per_chunk


def _round_trip(codec, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    message = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
    return decode_part(message), message.ByteSize()


def test_topk_keeps_the_largest_of_each_chunk_at_four_levels() -> None:
    values = 3 * CHUNK + 1000  # a partial last chunk
    part = torch.randn(values, generator=torch.Generator().manual_seed(0))
    decoded, size = _round_trip(TopK2Bit(), part)
    k = kept_per_chunk(values, 1 / 64)
    assert k == 64 and decoded.shape == part.shape
    for start in range(0, values, CHUNK):
        chunk, sent = part[start:start + CHUNK], decoded[start:start + CHUNK]
        kept = sent != 0
        largest = chunk.abs().topk(min(k, chunk.numel())).indices
        assert kept[largest].all() and int(kept.sum()) == min(k, chunk.numel())
        assert torch.equal(torch.sign(sent[kept]), torch.sign(chunk[kept]))
        magnitudes = sent[kept].abs().unique()
        assert len(magnitudes) == 2  # hi and lo: the means of the larger and the smaller half
        top = chunk.abs().topk(k).values
        assert torch.allclose(magnitudes.sort().values, torch.stack([top[k // 2:].mean(), top[:k // 2].mean()]))
    # 12-bit index + sign per kept value and two float32 scales per chunk (the partial one keeps 64 too),
    # plus a header: 1/146 of float32 for whole chunks.
    assert size <= 4 * (64 * 13 // 8 + 8) + 32


def test_topk_with_error_feedback_loses_nothing_over_rounds() -> None:
    codec, gradient = TopK2Bit(), torch.randn(CHUNK, generator=torch.Generator().manual_seed(1))
    residual, delivered, errors = torch.zeros(CHUNK), torch.zeros(CHUNK), {}
    for rounds in range(1, 1601):  # the same pseudo-gradient every round: the mean delivered converges to it
        sent, _ = _round_trip(codec, gradient + residual)
        residual = gradient + residual - sent
        delivered += sent
        errors[rounds] = float((delivered / rounds - gradient).norm() / gradient.norm())
    # What is held back stays bounded (about C/k rounds of it), so the mean's error falls as 1/rounds.
    assert errors[1] > 0.5 and errors[1600] < 0.02 and errors[1600] < errors[400] / 2.5


def test_small_parts_keep_at_least_two_values_and_density_is_checked() -> None:
    assert kept_per_chunk(64, 1 / 64) == 2 and kept_per_chunk(10**6, 1 / 64) == 64 and kept_per_chunk(3, 1.0) == 4
    decoded, _ = _round_trip(TopK2Bit(), torch.tensor([0.5, -3.0, 0.1]))
    assert decoded[1] < 0 and decoded[0] > 0 and decoded[2] == 0
    with pytest.raises(ValueError, match="density"):
        TopK2Bit(density=0.0)


def test_a_sparse_average_goes_back_to_float16_precision_and_decodes_alike() -> None:
    average = torch.zeros(2 * CHUNK + 7)
    positions = torch.randperm(average.numel(), generator=torch.Generator().manual_seed(2))[:300]
    average[positions] = torch.randn(300, generator=torch.Generator().manual_seed(3)) * 1e-4  # below float16's normals
    message = SparseScaledHalf().compress(average, CompressionInfo.from_tensor(average))
    decoded = decode_part(message)
    assert torch.equal(decoded != 0, average != 0)
    assert float((decoded - average).abs().max() / average.abs().max()) < 1e-3
    assert torch.equal(decoded, decode_part(type(message).FromString(message.SerializeToString())))
    assert message.ByteSize() < 300 * 5 + 64  # 12-bit index and 16-bit value per nonzero, per-chunk counts and scales


def test_hivemind_messages_still_decode_and_broken_sparse_ones_are_refused() -> None:
    part = torch.randn(100)
    assert torch.allclose(decode_part(Float16Compression().compress(part, CompressionInfo.from_tensor(part))), part,
                          atol=1e-2)
    message = TopK2Bit().compress(torch.randn(CHUNK), CompressionInfo.from_tensor(torch.randn(CHUNK)))
    truncated = type(message)()
    truncated.CopyFrom(message)
    truncated.buffer = message.buffer[:-3]
    with pytest.raises(SparseCodecError, match="truncated or corrupt"):
        decode_part(truncated)
    reshaped = type(message)()
    reshaped.CopyFrom(message)
    del reshaped.size[:]
    reshaped.size.append(CHUNK + 1)
    with pytest.raises(SparseCodecError, match="for a tensor of shape"):
        decode_part(reshaped)
    huge = type(message)()  # a header claiming billions of values: refused before anything is allocated
    huge.CopyFrom(message)
    huge.buffer = message.buffer[:4] + (2**31).to_bytes(4, "little") + message.buffer[8:]
    del huge.size[:]
    huge.size.append(2**31)
    with pytest.raises(SparseCodecError, match="at most"):
        decode_part(huge)


def test_every_compression_a_run_may_name_exists_in_the_worker() -> None:
    assert tuple(COMPRESSIONS) == choices.COMPRESSIONS
    assert RunSettings(compression="topk2bit", error_feedback=True, verify_fraction=0).compression == "topk2bit"
    with pytest.raises(ValueError, match="cannot compare a sparse pseudo-gradient with its replay; set verify_fraction = 0"):
        RunSettings(compression="topk2bit")  # spot checks are on by default
    with pytest.raises(GovernanceError, match="compression = 'topk2bit' is out of range"):
        check_config({"compression": "topk2bit"}, "proposal change 'config'")
    check_config({"compression": "8bit"}, "proposal change 'config'")
    with pytest.raises(ValueError, match="compression 'zip' is not one of none, fp16, 8bit, topk2bit"):
        RunSettings(compression="zip")
