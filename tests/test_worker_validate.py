"""A validator's replay and verdict (worker/validate.py), on the real model, shards and sketches.

A round is trained here as a worker trains it (worker/step.py from the round's start
state, a fresh AdamW, batches from its leases in its schedule's order), and judged
against claims and reducers' witnesses of what it sent, honest and not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoints import tensors_digest
from model.presets import build_model
from model.shards import Manifest, ShardInfo
from protocol import essaim_pb2 as pb
from worker.data import batches
from worker.device import plan_device
from worker.shards import ShardStore
from worker.step import inner_optimizer, inner_step, probe_loss
from worker.validate import RoundStates, Tolerances, judge, replay_round
from worker.witness import sketch

CONFIG = pb.RunConfig(model_preset="tiny", seed=3, seq_len=32, batch_size=2, inner_lr=1e-3)
ROUND = 5
PLAN = plan_device("cpu", "fp32")


def lease_of(shard: ShardInfo, start: int, end: int, lease_id: int) -> pb.Lease:
    return pb.Lease(lease_id=lease_id, shard_id=shard.shard_id, shard_file=shard.file, shard_sha256=shard.sha256,
                    shard_tokens=shard.tokens, dtype=shard.dtype, start=start, end=end, round=ROUND)


@pytest.fixture(scope="module")
def setup(corpus_dir: Path):  # type: ignore[no-untyped-def]
    manifest = Manifest.load(corpus_dir / "manifest.json")
    config = pb.RunConfig()
    config.CopyFrom(CONFIG)
    config.vocab_size = manifest.vocab_size
    reader = ShardStore(corpus_dir, manifest)
    shards = manifest.shards
    leases = [lease_of(shards[0], 0, 192, 11), lease_of(shards[1], 64, 256, 12)]
    other = lease_of(shards[2], 0, 192, 11)  # what a wrong-shard worker reads instead of lease 11
    model = build_model(config.model_preset, config.vocab_size, config.seed)
    start = [p.detach().clone() for p in model.parameters()]
    yield config, reader, leases, other, start
    reader.close()


def train_like_a_worker(config: pb.RunConfig, reader: ShardStore, read: dict[int, pb.Lease], schedule: list[int],
                        start: list[torch.Tensor]) -> tuple[pb.WorkClaim, torch.Tensor]:
    """A worker's round: its claim and its own pseudo-gradient, flattened."""
    model = build_model(config.model_preset, config.vocab_size, config.seed)
    params = list(model.parameters())
    with torch.no_grad():
        for param, value in zip(params, start):
            param.copy_(value)
    optimizer = inner_optimizer(params, config.inner_lr, PLAN)
    streams = {i: batches(reader.tokens(lease), config.batch_size, config.seq_len) for i, lease in read.items()}
    probe, before = None, 0.0
    for lease_id in schedule:
        batch = next(streams[lease_id])
        if probe is None:
            probe, before = batch, probe_loss(model, batch, PLAN)
        inner_step(model, optimizer, batch, PLAN)
    pseudo = [value - param.detach() for value, param in zip(start, params)]
    flat = torch.cat([p.reshape(-1) for p in pseudo])
    claim = pb.WorkClaim(pseudo_gradient_digest=tensors_digest(pseudo), pseudo_gradient_norm=float(flat.double().norm()),
                         loss_before=before, loss_after=probe_loss(model, probe, PLAN), step_leases=schedule,
                         device=PLAN.describe(), precision="fp32")
    return claim, flat


def witnesses_of(sent: torch.Tensor, slices: int = 3) -> list[pb.SliceWitness]:
    """What `slices` reducers report of a sender's vector, a contiguous slice each."""
    bounds = torch.linspace(0, sent.numel(), slices + 1).long().tolist()
    found = []
    for start, end in zip(bounds, bounds[1:]):
        seen = sketch(sent, start, end, ROUND)
        found.append(pb.SliceWitness(sender_peer_id="Qm", start=start, end=end, finite=seen.finite, norm=seen.norm,
                                     projections=seen.projections))
    return found


SCHEDULE = [11, 12, 11, 12, 11, 12]  # three batches of 2 x 32 tokens from each lease, in turn
USAGE = [pb.LeaseUsage(lease_id=11, tokens_consumed=192), pb.LeaseUsage(lease_id=12, tokens_consumed=192)]


def check_for(claim: pb.WorkClaim, witnesses: list[pb.SliceWitness], classes: list[str], leases) -> pb.CheckAssignment:  # type: ignore[no-untyped-def]
    return pb.CheckAssignment(check_id=7, round=ROUND, leases=leases, usage=USAGE, claim=claim, witnesses=witnesses,
                              witness_classes=classes)


@pytest.fixture(scope="module")
def honest(setup):  # type: ignore[no-untyped-def]
    config, reader, leases, _, start = setup
    claim, flat = train_like_a_worker(config, reader, {lease.lease_id: lease for lease in leases}, SCHEDULE, start)
    model = build_model(config.model_preset, config.vocab_size, config.seed)
    replay = replay_round(model, start, leases, SCHEDULE, reader, config, PLAN, 0)
    return claim, flat, replay


def test_an_honest_round_replays_bit_for_bit_on_the_same_cpu_and_passes(setup, honest) -> None:
    leases = setup[2]
    claim, flat, replay = honest
    assert replay.digest == claim.pseudo_gradient_digest
    verdict = judge(check_for(claim, witnesses_of(flat), ["volunteer"] * 3, leases), replay)
    assert verdict.outcome == pb.VerdictRequest.PASSED and verdict.exact, verdict.reason
    assert verdict.cosine > 0.99


@pytest.mark.parametrize("kind", ["x100", "sign_flip", "random", "zero_sent"])
def test_a_worker_that_trains_honestly_but_sends_something_else_is_convicted_by_its_reducers(setup, honest,
                                                                                            kind: str) -> None:
    leases = setup[2]
    claim, flat, replay = honest
    sent = {"x100": flat * 100, "sign_flip": -flat, "zero_sent": torch.zeros_like(flat),
            "random": torch.randn_like(flat) * flat.norm() / flat.numel() ** 0.5}[kind]
    verdict = judge(check_for(claim, witnesses_of(sent), ["volunteer"] * 3, leases), replay)
    assert verdict.outcome == pb.VerdictRequest.FAILED, verdict.reason
    assert "reducers saw it send values" in verdict.reason
    assert verdict.exact  # its claim was honest: only what it sent gives it away


def test_one_volunteer_reducer_can_neither_frame_a_worker_nor_let_it_be_verified_but_a_certified_one_is_believed(setup, honest) -> None:
    leases = setup[2]
    claim, flat, replay = honest
    witnesses = witnesses_of(flat)
    framed = witnesses_of(flat * 100)[0]
    witnesses[0].CopyFrom(framed)  # one reducer lies about what it saw
    alone = judge(check_for(claim, witnesses, ["volunteer"] * 3, leases), replay)
    assert alone.outcome == pb.VerdictRequest.INCONCLUSIVE and "one word is not enough" in alone.reason
    certified = judge(check_for(claim, witnesses, ["hpc", "volunteer", "volunteer"], leases), replay)
    assert certified.outcome == pb.VerdictRequest.FAILED


def test_nan_seen_by_two_reducers_convicts(setup, honest) -> None:
    leases = setup[2]
    claim, flat, replay = honest
    witnesses = witnesses_of(torch.full_like(flat, float("nan")))
    assert not witnesses[0].finite
    verdict = judge(check_for(claim, witnesses, ["volunteer"] * 3, leases), replay)
    assert verdict.outcome == pb.VerdictRequest.FAILED and "NaN or infinity" in verdict.reason


def test_a_free_rider_that_trained_nothing_is_caught_by_its_claim(setup, honest) -> None:
    leases = setup[2]
    claim, flat, replay = honest
    zero = torch.zeros_like(flat)
    lazy = pb.WorkClaim()
    lazy.CopyFrom(claim)
    lazy.pseudo_gradient_digest = tensors_digest([zero])
    lazy.pseudo_gradient_norm = 0.0
    lazy.loss_after = lazy.loss_before
    verdict = judge(check_for(lazy, witnesses_of(zero), ["volunteer"] * 3, leases), replay)
    assert verdict.outcome == pb.VerdictRequest.FAILED and "claims a pseudo-gradient of norm 0" in verdict.reason


def test_a_worker_that_trained_on_another_shard_is_caught(setup, honest) -> None:
    config, reader, leases, other, start = setup
    _, _, replay = honest
    claim, flat = train_like_a_worker(config, reader, {11: other, 12: leases[1]}, SCHEDULE, start)
    verdict = judge(check_for(claim, witnesses_of(flat), ["volunteer"] * 3, leases), replay)
    assert verdict.outcome == pb.VerdictRequest.FAILED, verdict.reason
    assert not verdict.exact


def test_a_schedule_or_usage_that_does_not_fit_the_leases_fails(setup, honest) -> None:
    config, reader, leases, _, start = setup
    claim, flat, replay = honest
    check = check_for(claim, witnesses_of(flat), ["volunteer"] * 3, leases)
    del check.usage[:]
    check.usage.extend([pb.LeaseUsage(lease_id=11, tokens_consumed=160), USAGE[1]])  # not what it trained
    verdict = judge(check, replay)
    assert verdict.outcome == pb.VerdictRequest.FAILED and "its report says" in verdict.reason
    model = build_model(config.model_preset, config.vocab_size, config.seed)
    with pytest.raises(ValueError, match="more batches from lease 11 than it holds"):
        replay_round(model, start, leases, [11] * 4, reader, config, PLAN, 0)
    with pytest.raises(ValueError, match="lease 99, which the report does not name"):
        replay_round(model, start, leases, [99], reader, config, PLAN, 0)


def test_a_replay_off_by_a_little_passes_within_tolerances_and_off_by_more_fails(setup, honest) -> None:
    leases = setup[2]
    claim, flat, replay = honest
    near = pb.WorkClaim()
    near.CopyFrom(claim)
    near.pseudo_gradient_digest = "0" * 64  # as a GPU in bf16 would: not bit-exact
    near.pseudo_gradient_norm = claim.pseudo_gradient_norm * 1.01
    noisy = flat + 0.05 * flat.norm() / flat.numel() ** 0.5 * torch.randn_like(flat)  # 5 % noise
    verdict = judge(check_for(near, witnesses_of(noisy), ["hpc"] * 3, leases), replay)
    assert verdict.outcome == pb.VerdictRequest.PASSED and not verdict.exact, verdict.reason
    near.pseudo_gradient_norm = claim.pseudo_gradient_norm * (1 + 2 * Tolerances().norm)
    assert judge(check_for(near, witnesses_of(noisy), ["hpc"] * 3, leases), replay).outcome == pb.VerdictRequest.FAILED


def test_round_states_keep_the_newest_few_by_digest() -> None:
    states = RoundStates(keep=2)
    digests = [states.add([torch.full((3,), float(i))]) for i in range(3)]
    assert states.get(digests[0]) is None
    assert torch.equal(states.get(digests[2])[0], torch.full((3,), 2.0))


def test_a_claim_of_nan_fails_rather_than_slipping_past_every_tolerance(setup, honest) -> None:
    leases = setup[2]
    claim, flat, replay = honest
    nan = pb.WorkClaim()
    nan.CopyFrom(claim)
    nan.pseudo_gradient_digest, nan.pseudo_gradient_norm = "0" * 64, float("nan")
    verdict = judge(check_for(nan, witnesses_of(flat), ["volunteer"] * 3, leases), replay)
    assert verdict.outcome == pb.VerdictRequest.FAILED and "non-finite" in verdict.reason
