"""Held-out evaluation during a run: after the outer step of every ``eval_every_rounds``-th round.

Every member of an averaging group ends the round with bit-identical parameters, so one
evaluation per group is enough: the member whose sha256 of (round, worker id) is lowest
among the group's signed member statements evaluates (model.eval_figures.evaluator_of),
and sends the figures with its report (CompleteRoundRequest.evaluation, stamped with the
parameters' digest). The choice changes with the round, so the cost does not fall on the
same worker every time, and a worker alone (a group of one) evaluates its own parameters.
The coordinator keeps figures from that member only. If its report is lost, that round
has no evaluation: the next one due will.

The held-out shards are read like leased ones (worker/shards.py: a local copy, or chunks
fetched from the coordinator or the data_url, each checked against the manifest), once,
and kept in memory: at most ``max_tokens_per_source`` tokens per source.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
from tokenizers import Tokenizer

from model.eval_figures import DEFAULT_MAX_TOKENS_PER_SOURCE, evaluator_of
from model.evaluate import HeldOutRows, evaluate_heldout, heldout_rows
from model.shards import ShardInfo, ShardIntegrityError
from model.text_bytes import token_byte_lengths
from protocol import essaim_pb2 as pb
from worker.diloco import DiLoCoTrainer, RoundResult
from worker.shards import ShardStore, ShardUnavailable

log = logging.getLogger("essaim.worker.evaluation")


def statement_workers(statements: list[bytes]) -> list[str]:
    """The worker ids of a group's member statements (their signatures were checked when the group formed)."""
    return [pb.MemberStatement.FromString(pb.Signed.FromString(blob).body).worker_id for blob in statements]


class RoundEvaluator:
    def __init__(self, config: pb.RunConfig, store: ShardStore, worker_id: str,
                 max_tokens_per_source: int = DEFAULT_MAX_TOKENS_PER_SOURCE) -> None:
        self.every = config.eval_every_rounds
        self.seq_len = config.seq_len
        self.worker_id = worker_id
        self.store = store
        self.max_tokens_per_source = max_tokens_per_source
        self.byte_lengths = token_byte_lengths(Tokenizer.from_str(config.tokenizer_json.decode("utf-8")))
        self._rows: list[HeldOutRows] | None = None
        self._unavailable = False  # the run's corpus has no held-out split: said once

    def due(self, round_number: int) -> bool:
        return self.every > 0 and (round_number + 1) % self.every == 0 and not self._unavailable

    def after_outer_step(self, trainer: DiLoCoTrainer, result: RoundResult) -> pb.Evaluation | None:
        """The round's figures, if the round is due and this worker is its group's evaluator; else None."""
        if not self.due(result.round):
            return None
        members = [*statement_workers(result.member_statements), self.worker_id]
        if evaluator_of(result.round, members) != self.worker_id:
            return None
        rows = self._heldout()
        if not rows:
            return None
        try:
            figures = evaluate_heldout(trainer.model, rows, self.byte_lengths, self.seq_len, trainer.plan)
        except (RuntimeError, ValueError) as error:  # out of device memory, tokens of another tokenizer
            log.warning("round %d: the held-out evaluation failed (%s): reported without it", result.round, error)
            return None
        overall = next((f for f in figures if f.group == "all"), None)
        if overall is None:
            return None  # rows of document ends only: no text to measure
        log.info("round %d: held-out loss %.3f, %.3f bits per byte (%d tokens)", result.round, overall.loss,
                 overall.bits_per_byte, overall.tokens)
        return pb.Evaluation(params_digest=result.params_digest,
                             figures=[pb.EvalFigure(**asdict(figure)) for figure in figures])

    def _heldout(self) -> list[HeldOutRows]:
        """The held-out rows, read the first time; [] if there are none, or they could not be read this time."""
        if self._rows is None:
            manifest = self.store.manifest
            try:
                if manifest is None:
                    raise ValueError("the run's manifest is not known here")
                self._rows = heldout_rows(manifest, self._read, self.seq_len, self.max_tokens_per_source)
            except ValueError as error:
                log.warning("no held-out evaluation in this run: %s", error)
                self._unavailable = True
                return []
            except (ShardUnavailable, ShardIntegrityError) as error:  # a failed download: tried again next time
                log.warning("the held-out shards could not be read (%s): no evaluation this round", error)
                return []
        return self._rows

    def _read(self, shard: ShardInfo, start: int, end: int) -> torch.Tensor:
        lease = pb.Lease(shard_id=shard.shard_id, shard_file=shard.file, shard_sha256=shard.sha256,
                         shard_tokens=shard.tokens, dtype=shard.dtype, start=start, end=end)
        return self.store.tokens(lease, heldout=True)
