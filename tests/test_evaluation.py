"""Held-out evaluation: bits per byte as computed by hand, grouped per language and source; who evaluates a round."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from model.eval_figures import EvalFigure, evaluator_of, figure_problem
from model.evaluate import HeldOutRows, evaluate_heldout, heldout_rows
from model.presets import build_model
from model.shards import Manifest, ShardInfo, SourceInfo, read_tokens, write_shard
from protocol import essaim_pb2 as pb
from protocol.credentials import sign_statement
from protocol.identity import Identity
from worker.evaluation import statement_workers

VOCAB = 300
SEQ_LEN = 12
BYTES = np.arange(VOCAB, dtype=np.int64) % 4  # a token stands for 0 to 3 bytes


def by_hand(model: torch.nn.Module, rows: torch.Tensor) -> tuple[float, int, int]:
    """Summed nats of every next-token prediction, their count, and the bytes of the predicted tokens."""
    with torch.no_grad():
        logits = model(input_ids=rows).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = rows[:, 1:]
    nats = -log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
    return nats, targets.numel(), int(BYTES[targets.numpy()].sum())


def test_loss_and_bits_per_byte_per_source_language_and_overall_match_a_hand_computation() -> None:
    model = build_model("tiny", VOCAB, seed=0)
    generator = torch.Generator().manual_seed(1)
    held = [HeldOutRows("wiki-fr", "fr", torch.randint(0, VOCAB, (3 * SEQ_LEN,), generator=generator)),
            HeldOutRows("news-fr", "fr", torch.randint(0, VOCAB, (2 * SEQ_LEN,), generator=generator)),
            HeldOutRows("code", "code", torch.randint(0, VOCAB, (5 * SEQ_LEN,), generator=generator))]
    figures = evaluate_heldout(model, held, BYTES, SEQ_LEN, batch_rows=2)
    assert [(f.group, f.name) for f in figures] == [
        ("all", "all"), ("language", "code"), ("language", "fr"), ("source", "code"), ("source", "news-fr"),
        ("source", "wiki-fr")]
    hand = {part.source: by_hand(model, part.tokens.view(-1, SEQ_LEN)) for part in held}
    pooled = {"all": list(hand.values()), "code": [hand["code"]], "fr": [hand["wiki-fr"], hand["news-fr"]],
              **{name: [figures] for name, figures in hand.items()}}
    for figure in figures:
        nats, tokens, text_bytes = (sum(column) for column in zip(*pooled[figure.name]))
        assert (figure.tokens, figure.bytes) == (tokens, text_bytes)
        assert figure.loss == pytest.approx(nats / tokens, rel=1e-5)
        assert figure.bits_per_byte == pytest.approx(nats / (text_bytes * math.log(2)), rel=1e-5)
        assert figure_problem(figure) == ""
    assert evaluate_heldout(model, held, BYTES, SEQ_LEN, batch_rows=2) == figures  # deterministic
    assert model.training  # left as it was found


def test_held_out_rows_are_the_first_whole_rows_of_each_source_in_shard_order(tmp_path: Path) -> None:
    tokens = {"a-0": np.arange(30), "a-1": np.arange(100, 125), "b-0": np.arange(200, 210)}
    heldout = []
    for shard_id, values in tokens.items():
        sha256 = write_shard(values, tmp_path / f"{shard_id}.bin", "uint16")
        source = shard_id[0]
        heldout.append(ShardInfo(f"_heldout-{shard_id}", f"{shard_id}.bin", sha256, len(values), "uint16", source,
                                 source, "CC0-1.0", "2020-01-01", "2020-01-01"))
    sources = [SourceInfo(name, name, "CC0-1.0", 1.0, "2020-01-01", "2020-12-31") for name in "ab"]
    manifest = Manifest(VOCAB, "t" * 64, sources, [], heldout=heldout[::-1])

    def read(shard: ShardInfo, start: int, end: int) -> torch.Tensor:
        return torch.from_numpy(read_tokens(tmp_path / shard.file, shard.dtype, start, end))

    rows = heldout_rows(manifest, read, SEQ_LEN, max_tokens_per_source=50)
    assert [(r.source, r.language) for r in rows] == [("a", "a")]  # b's 10 tokens are less than a row
    assert rows[0].tokens.tolist() == [*range(30), *range(100, 118)]  # 48 of at most 50: whole rows, a-0 first
    with pytest.raises(ValueError, match="less than one row of 12"):
        heldout_rows(manifest, read, SEQ_LEN, max_tokens_per_source=11)
    with pytest.raises(ValueError, match="no held-out split.*re-run `essaim data prepare`"):
        heldout_rows(Manifest(VOCAB, "t" * 64, sources, []), read, SEQ_LEN)


@pytest.mark.parametrize("figure,problem", [
    (EvalFigure("all", "all", 10, 20, float("nan"), 1.0), "must be finite and >= 0"),
    (EvalFigure("all", "all", 10, 20, -1.0, -0.72), "must be finite and >= 0"),
    (EvalFigure("all", "all", 0, 20, 1.0, 0.0), "must both be positive"),
    (EvalFigure("region", "eu", 10, 20, 1.0, 0.72), "group must be one of all, language, source"),
    (EvalFigure("all", "all", 10, 20, 1.0, 0.5), "is not loss x tokens / \\(bytes x ln 2\\)"),
])
def test_malformed_figures_are_named(figure: EvalFigure, problem: str) -> None:
    assert re.search(problem, figure_problem(figure))


def test_one_member_of_a_group_evaluates_and_the_duty_rotates_with_rounds() -> None:
    members = [Identity.generate() for _ in range(3)]
    statements = [sign_statement(m, pb.MemberStatement(worker_id=m.worker_id, round=7)) for m in members]
    ids = statement_workers(statements)
    assert ids == [m.worker_id for m in members]
    chosen = [evaluator_of(round_number, ids) for round_number in range(30)]
    assert set(chosen) == set(ids)  # each member takes a turn over 30 rounds
    # Every member computes the same choice, whatever order it sees the statements in.
    assert all(evaluator_of(r, ids[::-1]) == chosen[r] for r in range(30))
