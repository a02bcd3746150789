"""Top-k + 2-bit pseudo-gradients (SparseLoCo-style), in hivemind's tensor message.

A sender keeps, in every chunk of CHUNK values of its part, the k largest by magnitude
(k = CHUNK * density, 64 of 4,096 by default) and sends each as one of four levels:
+-hi for the larger half of them and +-lo for the smaller half, where hi and lo are the
means of the two halves' magnitudes. The half a value belongs to is implied by its place
in the message (the larger half first), so a kept value costs its 12-bit index in the
chunk and a sign bit, plus two float32 scales per chunk: about 14 bits, against 32 for a
float32 value, so 1/146 of float32's bytes at density 1/64. What a sender drops stays in
its error-feedback residual (worker/allreduce.py) and goes out in a later round.

A reducer's aggregate of such parts is sparse too (the union of the senders' supports),
and goes back as SparseScaledHalf: each nonzero's 12-bit index and its value in float16
scaled by its chunk's largest magnitude. Every peer decodes those same bytes the same way,
so peers still end bit-identical.

hivemind's deserialize_torch_tensor dispatches on its fixed CompressionType enum, so these
messages carry codes outside it (proto3 keeps unknown enum values) and decode_part
reads them; any other message goes to hivemind.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.proto import runtime_pb2

TOPK_2BIT_CODE = 101      # runtime_pb2.Tensor.compression values past hivemind's CompressionType
SPARSE_HALF_CODE = 102
CHUNK = 4096              # values per chunk: an index in it fits 12 bits
DEFAULT_DENSITY = 1 / 64  # kept values per chunk value: 64 of 4,096
# The most values a message may decode to. hivemind sizes parts by the codec's ratio (512 KiB of message):
# about 20 M values at the default density. A hostile peer's header must not make a reducer allocate more.
MAX_PART_VALUES = 2**25

_TOPK_HEADER = struct.Struct("<HHI")   # chunk, kept per chunk, values in the part
_SPARSE_HEADER = struct.Struct("<HII")  # chunk, values in the part, nonzeros


class SparseCodecError(ValueError):
    """A sparse message that cannot be decoded: truncated, or its header disagrees with its size."""


def kept_per_chunk(values: int, density: float) -> int:
    """k for a part of `values` values: density of a chunk (or of the part, if smaller), even, at least 2."""
    k = math.ceil(min(CHUNK, values) * density)
    return min(CHUNK, max(2, k + k % 2))


class TopK2Bit(CompressionBase):
    """A sender's part: the top-k of each chunk at four levels (see the module's docstring)."""

    compression_type = TOPK_2BIT_CODE
    compress_own_part = True  # a reducer's own part goes through it too, so the aggregate stays sparse

    def __init__(self, density: float = DEFAULT_DENSITY) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"top-k density must be in (0, 1], not {density}")
        self.density = density
        self.reply_codec = SparseScaledHalf()

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().to("cpu", torch.float32).reshape(-1)
        values, k = flat.numel(), kept_per_chunk(flat.numel(), self.density)
        chunks = max(1, math.ceil(values / CHUNK))
        padded = torch.zeros(chunks * CHUNK, dtype=torch.float32)
        padded[:values] = flat
        rows = padded.view(chunks, CHUNK)
        magnitudes, indices = rows.abs().topk(k, dim=1, sorted=True)  # the larger half first
        signs = torch.gather(rows, 1, indices) < 0
        half = k // 2
        scales = torch.stack([magnitudes[:, :half].mean(dim=1), magnitudes[:, half:].mean(dim=1)], dim=1)
        buffer = b"".join((
            _TOPK_HEADER.pack(CHUNK, k, values),
            scales.numpy().astype("<f4").tobytes(),
            np.packbits(signs.numpy().reshape(-1)).tobytes(),
            _pack12(indices.numpy().reshape(-1)),
        ))
        return runtime_pb2.Tensor(buffer=buffer, size=list(tensor.shape), dtype="float32",
                                  compression=TOPK_2BIT_CODE, requires_grad=False)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return _extract_topk(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        k = kept_per_chunk(info.descriptor.numel(), self.density)
        return (k * 13 + 64) / (CHUNK * 32)


class SparseScaledHalf(CompressionBase):
    """A sparse tensor's nonzeros: 12-bit indices in their chunk, values in float16 scaled per chunk."""

    compression_type = SPARSE_HALF_CODE

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().to("cpu", torch.float32).reshape(-1)
        values = flat.numel()
        chunks = max(1, math.ceil(values / CHUNK))
        positions = torch.nonzero(flat, as_tuple=True)[0]
        kept = flat[positions]
        chunk_of = positions // CHUNK
        counts = torch.bincount(chunk_of, minlength=chunks)
        scales = torch.zeros(chunks, dtype=torch.float32).scatter_reduce(0, chunk_of, kept.abs(), "amax")
        # A chunk's largest value is +-1 in float16: every nonzero keeps float16's 11 significant bits.
        halves = (kept / scales[chunk_of]).to(torch.float16)
        buffer = b"".join((
            _SPARSE_HEADER.pack(CHUNK, values, positions.numel()),
            counts.numpy().astype("<u2").tobytes(),
            scales.numpy().astype("<f4").tobytes(),
            halves.numpy().astype("<f2").tobytes(),
            _pack12((positions % CHUNK).numpy()),
        ))
        return runtime_pb2.Tensor(buffer=buffer, size=list(tensor.shape), dtype="float32",
                                  compression=SPARSE_HALF_CODE, requires_grad=False)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return _extract_sparse(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return 0.1  # depends on the support; only part sizing reads it


def decode_part(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    """Any averaging message's tensor: these sparse codes here, hivemind's own codes by hivemind."""
    if serialized.compression == TOPK_2BIT_CODE:
        return _extract_topk(serialized)
    if serialized.compression == SPARSE_HALF_CODE:
        return _extract_sparse(serialized)
    return deserialize_torch_tensor(serialized)


def _extract_topk(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    buffer = serialized.buffer
    chunk, k, values = _header(_TOPK_HEADER, buffer)
    chunks = max(1, math.ceil(values / chunk))
    kept = chunks * k
    _check_shape(serialized, values)
    sizes = (chunks * 2 * 4, math.ceil(kept / 8), _packed12_size(kept))
    scales, sign_bits, packed = _split(buffer, _TOPK_HEADER.size, sizes, "top-k 2-bit")
    if k % 2 or not 2 <= k <= chunk <= CHUNK:
        raise SparseCodecError(f"a top-k 2-bit message keeping {k} of {chunk} values: not a valid chunking")
    levels = torch.from_numpy(np.frombuffer(scales, dtype="<f4").astype(np.float32).reshape(chunks, 2))
    half = k // 2
    magnitudes = torch.cat([levels[:, :1].expand(chunks, half), levels[:, 1:].expand(chunks, half)], dim=1)
    signs = torch.from_numpy(np.unpackbits(np.frombuffer(sign_bits, dtype=np.uint8))[:kept].astype(np.bool_))
    kept_values = torch.where(signs.view(chunks, k), -magnitudes, magnitudes)
    indices = torch.from_numpy(_unpack12(packed, kept).astype(np.int64)).view(chunks, k)
    if int(indices.max()) >= chunk:
        raise SparseCodecError(f"a top-k 2-bit message with an index past its chunk of {chunk}")
    out = torch.zeros(chunks, chunk, dtype=torch.float32).scatter_(1, indices, kept_values)
    return out.view(-1)[:values].reshape(tuple(serialized.size)).clone()


def _extract_sparse(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    buffer = serialized.buffer
    chunk, values, nonzeros = _header(_SPARSE_HEADER, buffer)
    if not 1 <= chunk <= CHUNK:
        raise SparseCodecError(f"a sparse message with chunks of {chunk} values: at most {CHUNK}")
    chunks = max(1, math.ceil(values / chunk))
    _check_shape(serialized, values)
    sizes = (chunks * 2, chunks * 4, nonzeros * 2, _packed12_size(nonzeros))
    counts, scales, halves, packed = _split(buffer, _SPARSE_HEADER.size, sizes, "sparse")
    counts_array = np.frombuffer(counts, dtype="<u2").astype(np.int64)
    if int(counts_array.sum()) != nonzeros:
        raise SparseCodecError(f"a sparse message whose chunks hold {int(counts_array.sum())} nonzeros, not {nonzeros}")
    chunk_of = torch.repeat_interleave(torch.arange(chunks), torch.from_numpy(counts_array))
    positions = chunk_of * chunk + torch.from_numpy(_unpack12(packed, nonzeros).astype(np.int64))
    if nonzeros and int(positions.max()) >= values:
        raise SparseCodecError(f"a sparse message with a position past its {values} values")
    scale = torch.from_numpy(np.frombuffer(scales, dtype="<f4").astype(np.float32))[chunk_of]
    kept = torch.from_numpy(np.frombuffer(halves, dtype="<f2").astype(np.float32)) * scale
    out = torch.zeros(values, dtype=torch.float32)
    out[positions] = kept
    return out.reshape(tuple(serialized.size))


def _header(header: struct.Struct, buffer: bytes) -> tuple[int, ...]:
    if len(buffer) < header.size:
        raise SparseCodecError(f"a sparse message of {len(buffer)} bytes: shorter than its header")
    return header.unpack_from(buffer)


def _check_shape(serialized: runtime_pb2.Tensor, values: int) -> None:
    if values > MAX_PART_VALUES:
        raise SparseCodecError(f"a sparse message of {values} values: at most {MAX_PART_VALUES} are accepted")
    if math.prod(serialized.size) != values:
        raise SparseCodecError(f"a sparse message of {values} values for a tensor of shape {list(serialized.size)}")


def _split(buffer: bytes, offset: int, sizes: tuple[int, ...], kind: str) -> list[bytes]:
    if len(buffer) != offset + sum(sizes):
        raise SparseCodecError(f"a {kind} message of {len(buffer)} bytes where its header implies "
                               f"{offset + sum(sizes)}: truncated or corrupt")
    pieces = []
    for size in sizes:
        pieces.append(buffer[offset:offset + size])
        offset += size
    return pieces


def _packed12_size(count: int) -> int:
    return (count + count % 2) // 2 * 3


def _pack12(indices: np.ndarray) -> bytes:
    """Values below 4,096, two in three bytes."""
    values = indices.astype(np.uint16)
    if len(values) % 2:
        values = np.append(values, np.uint16(0))
    first, second = values[0::2], values[1::2]
    packed = np.empty((len(first), 3), dtype=np.uint8)
    packed[:, 0] = first & 0xFF
    packed[:, 1] = (first >> 8) | ((second & 0xF) << 4)
    packed[:, 2] = second >> 4
    return packed.tobytes()


def _unpack12(buffer: bytes, count: int) -> np.ndarray:
    packed = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, 3).astype(np.uint16)
    first = packed[:, 0] | ((packed[:, 1] & 0xF) << 8)
    second = (packed[:, 1] >> 4) | (packed[:, 2] << 4)
    return np.stack([first, second], axis=1).reshape(-1)[:count]
