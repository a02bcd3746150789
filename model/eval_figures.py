"""A held-out evaluation figure, as model/evaluate.py computes it, workers report it and the coordinator keeps it;
and which member of an averaging group evaluates a round.

Apart from model/evaluate.py so that the coordinator, which never loads a model, reads
and checks figures without importing torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

GROUPS = ("all", "language", "source")
DEFAULT_MAX_TOKENS_PER_SOURCE = 16_384  # evaluated per source: a few seconds of a small model on a CPU
# Reported bits per byte must agree with loss x tokens / (bytes x ln 2) to this relative error
# (float32 on the wire would do; the proto carries doubles).
_CONSISTENCY = 1e-6


@dataclass(frozen=True)
class EvalFigure:
    """One held-out figure; its fields are pb.EvalFigure's (protocol/essaim.proto)."""

    group: str            # all | language | source
    name: str             # "all", a language code or a source name
    tokens: int           # tokens predicted (a row's first token is context only)
    bytes: int            # UTF-8 bytes of the text those tokens encode
    loss: float           # mean nats per predicted token
    bits_per_byte: float  # loss x tokens / (bytes x ln 2)


def evaluator_of(round_number: int, worker_ids: list[str]) -> str:
    """The member of a group that evaluates its round's parameters: the lowest sha256 of (round, worker id).

    Every member ends the round with the same parameters, so one evaluation is enough; the
    hash rotates the duty from round to round, and every member (and the coordinator, from
    the group's member statements) computes the same choice.
    """
    return min(worker_ids, key=lambda worker_id: hashlib.sha256(f"{round_number}:{worker_id}".encode()).digest())


def bits_per_byte(loss: float, tokens: int, text_bytes: int) -> float:
    return loss * tokens / (text_bytes * math.log(2))


def figure_problem(figure: EvalFigure) -> str:
    """What is wrong with a reported figure ("" if nothing): what the coordinator refuses to keep."""
    where = f"figure ({figure.group!r}, {figure.name!r})"
    if figure.group not in GROUPS:
        return f"{where}: group must be one of {', '.join(GROUPS)}"
    if not figure.name or len(figure.name) > 128:
        return f"{where}: name must be 1 to 128 characters (\"all\", a language or a source)"
    if figure.tokens <= 0 or figure.bytes <= 0:
        return f"{where}: tokens {figure.tokens} and bytes {figure.bytes} must both be positive"
    if not all(math.isfinite(v) and v >= 0 for v in (figure.loss, figure.bits_per_byte)):
        return f"{where}: loss {figure.loss} and bits_per_byte {figure.bits_per_byte} must be finite and >= 0"
    expected = bits_per_byte(figure.loss, figure.tokens, figure.bytes)
    if abs(figure.bits_per_byte - expected) > _CONSISTENCY * max(expected, 1e-12):
        return (f"{where}: bits_per_byte {figure.bits_per_byte} is not loss x tokens / (bytes x ln 2) = {expected}: "
                "the figures were altered or computed wrongly")
    return ""
