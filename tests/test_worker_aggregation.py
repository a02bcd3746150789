"""Robust aggregation rules, alone and inside real hivemind all-reduces, and the reducers' witnesses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model.presets import build_model
from protocol.swarm import Swarm
from support import outer_steps_together
from worker.aggregation import AGGREGATIONS, CLIP_MULTIPLE, median_norm
from worker.diloco import DiLoCoSettings, DiLoCoTrainer
from worker.witness import sketch

VOCAB = 300
PEERS = 4
TOKENS = [64] * PEERS
ATTACKER = PEERS - 1


def _parts(seed: int, count: int = 4, size: int = 64) -> list[torch.Tensor]:
    """Honest-looking parts: a shared direction plus each sender's own noise, alike in norm."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(size, generator=generator)
    return [shared + 0.5 * torch.randn(size, generator=generator) for _ in range(count)]


def _weighted_mean(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * p for w, p in zip(weights, parts)) / sum(weights)


# -- the rules alone ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", sorted(AGGREGATIONS))
def test_every_rule_leaves_out_parts_holding_nan_or_infinity(rule: str) -> None:
    honest = _parts(0)
    weights = [1.0, 2.0, 3.0, 4.0]
    poisoned = honest[:2] + [torch.full((64,), float("nan")), honest[2].clone().index_fill_(0, torch.tensor([5]), math.inf)]
    aggregate = AGGREGATIONS[rule](poisoned, weights)
    assert torch.equal(aggregate, AGGREGATIONS[rule](honest[:2], weights[:2]))
    assert torch.equal(AGGREGATIONS[rule](poisoned[2:], weights[2:]), torch.zeros(64))  # nothing finite: zeros


def test_the_mean_is_the_weighted_mean() -> None:
    parts, weights = _parts(1), [64.0, 128.0, 192.0, 256.0]
    assert torch.allclose(AGGREGATIONS["mean"](parts, weights), _weighted_mean(parts, weights), rtol=1e-6, atol=1e-7)


def test_the_clipped_mean_bounds_a_part_scaled_100x_to_twice_the_median_norm() -> None:
    honest = _parts(2, count=3)
    attacker = 100 * honest[0]
    weights = [1.0] * 4
    clipped = AGGREGATIONS["clipped_mean"]([*honest, attacker], weights)
    bound = CLIP_MULTIPLE * median_norm([float(p.norm()) for p in [*honest, attacker]])
    expected = _weighted_mean([*honest, attacker * (bound / float(attacker.norm()))], weights)
    assert torch.allclose(clipped, expected, rtol=1e-5, atol=1e-6)
    honest_mean = _weighted_mean(honest, [1.0] * 3)
    plain = AGGREGATIONS["mean"]([*honest, attacker], weights)
    assert (clipped - honest_mean).norm() < 0.05 * (plain - honest_mean).norm()
    assert torch.equal(AGGREGATIONS["clipped_mean"](honest, [1.0] * 3), AGGREGATIONS["mean"](honest, [1.0] * 3))


@pytest.mark.parametrize("attack", [lambda p: -p, lambda p: 100 * p])
def test_the_trimmed_mean_keeps_every_coordinate_within_the_honest_values_despite_one_outlier_among_four(attack) -> None:
    honest = _parts(3, count=3)
    trimmed = AGGREGATIONS["trimmed_mean"]([*honest, attack(honest[0])], [1.0, 2.0, 3.0, 4.0])
    stacked = torch.stack(honest)
    assert bool((trimmed >= stacked.min(dim=0).values - 1e-6).all() and (trimmed <= stacked.max(dim=0).values + 1e-6).all())


def test_the_trimmed_mean_weighs_the_values_it_keeps_by_their_senders_weights() -> None:
    parts = [torch.tensor([1.0, 40.0]), torch.tensor([2.0, 30.0]), torch.tensor([3.0, 20.0]), torch.tensor([10.0, 10.0])]
    trimmed = AGGREGATIONS["trimmed_mean"](parts, [1.0, 2.0, 3.0, 4.0])
    # Coordinate 0 keeps 2 (weight 2) and 3 (weight 3); coordinate 1 keeps 30 (weight 2) and 20 (weight 3).
    assert torch.allclose(trimmed, torch.tensor([(2 * 2 + 3 * 3) / 5, (30 * 2 + 20 * 3) / 5]))


@pytest.mark.parametrize("rule", sorted(AGGREGATIONS))
def test_every_rule_gives_the_same_bits_for_the_same_parts_in_the_same_order(rule: str) -> None:
    parts = [*_parts(4), 100 * _parts(5)[0]]
    weights = [1.0, 5.0, 2.0, 2.0, 7.0]
    first = AGGREGATIONS[rule]([p.clone() for p in parts], weights)
    assert torch.equal(first, AGGREGATIONS[rule]([p.clone() for p in parts], weights))


# -- inside a real all-reduce ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainers():
    settings = DiLoCoSettings(inner_lr=1e-2, outer_lr=0.7, outer_momentum=0.9, dht_prefix="aggregation",
                              target_group_size=PEERS, matchmaking_seconds=2.0, averaging_timeout_seconds=20.0,
                              fresh_inner_optimizer=True)
    swarms = [Swarm("127.0.0.1")]
    swarms += [Swarm("127.0.0.1", initial_peers=swarms[0].visible_addresses()) for _ in range(PEERS - 1)]
    started = [DiLoCoTrainer(build_model("tiny", VOCAB, seed=0), settings, swarm.dht) for swarm in swarms]
    yield started
    for trainer in started:
        trainer.shutdown()
    for swarm in reversed(swarms):
        swarm.close()


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _round(trainers: list[DiLoCoTrainer], rule: str, attack) -> tuple[list, list[torch.Tensor], torch.Tensor]:  # type: ignore[no-untyped-def]
    """Train apart, let the last peer send attack(what it trained), average under `rule`.

    Returns the round results, what each peer sent (flat) and the aggregate pseudo-gradient.
    """
    sent: list[torch.Tensor] = [torch.empty(0)] * len(trainers)
    for index, trainer in enumerate(trainers):
        trainer.set_aggregation(rule)
        batch = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1000 * trainer.round + index))
        trainer.inner_step(batch)
        assert trainer.inner_optimizer.state, "AdamW keeps state within a round"

        def record(buffers: list[torch.Tensor], index: int = index) -> None:
            if index == ATTACKER:
                for buffer in buffers:
                    buffer.copy_(attack(buffer))
            sent[index] = _flat(buffers).clone()
        trainer.sent_transform = record
    results = outer_steps_together(trainers, TOKENS)
    assert [r.group_size for r in results] == [PEERS] * PEERS, results
    assert len({r.params_digest for r in results}) == 1, "peers disagree after averaging"
    assert len({r.pseudo_gradient_digest for r in results}) == 1
    with trainers[0].averager.get_tensors() as averaged:
        aggregate = _flat(averaged).clone()
    return results, sent, aggregate


def _check_witnesses(trainers: list[DiLoCoTrainer], results: list, sent: list[torch.Tensor],
                     aggregate: torch.Tensor) -> None:
    """Each reducer's witnesses are the sketches of what each sender sent over its slice; slices tile the vector."""
    by_peer = {t.averager.peer_id.to_base58(): vector for t, vector in zip(trainers, sent)}
    slices = set()
    for result in results:
        if result.witnesses:
            assert sorted(w.sender_peer_id for w in result.witnesses) == sorted(by_peer)
            finite_norms = [w.norm for w in result.witnesses if w.finite]
            assert all(w.median_norm == median_norm(finite_norms) for w in result.witnesses)
        for witness in result.witnesses:
            slices.add((witness.start, witness.end))
            vector, seed = by_peer[witness.sender_peer_id], result.round
            replay = sketch(vector, witness.start, witness.end, seed)
            assert witness.finite == replay.finite
            if not witness.finite:
                continue
            scale = replay.norm
            assert abs(witness.norm - replay.norm) <= 1e-6 * scale
            assert all(abs(a - b) <= 1e-6 * scale for a, b in zip(witness.projections, replay.projections))
            part, average = vector[witness.start:witness.end].double(), aggregate[witness.start:witness.end].double()
            assert witness.cosine_to_aggregate == pytest.approx(float(part @ average / (part.norm() * average.norm())),
                                                                abs=1e-6)
    starts = sorted(slices)
    assert starts[0][0] == 0 and starts[-1][1] == aggregate.numel()
    assert all(a[1] == b[0] for a, b in zip(starts, starts[1:])), starts


def _honest_mean(sent: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v for i, v in enumerate(sent) if i != ATTACKER]).mean(dim=0)


def test_robust_rules_keep_peers_identical_resist_a_100x_peer_and_witness_what_each_sender_sent(trainers) -> None:
    drift = {}
    for rule in ("mean", "clipped_mean", "trimmed_mean"):
        results, sent, aggregate = _round(trainers, rule, lambda honest: 100 * honest)
        drift[rule] = float((aggregate - _honest_mean(sent)).norm() / _honest_mean(sent).norm())
        _check_witnesses(trainers, results, sent, aggregate)
        assert all(not t.inner_optimizer.state for t in trainers), "fresh_inner_optimizer: AdamW starts over"
        own = [r.local_norm for r in results]
        assert own[ATTACKER] == pytest.approx(float(sent[ATTACKER].double().norm()) / 100, rel=1e-5)  # the honest claim
    assert drift["mean"] > 10, drift
    assert drift["clipped_mean"] < 0.1 * drift["mean"] and drift["trimmed_mean"] < 0.1 * drift["mean"], drift


def test_a_peer_sending_nan_is_left_out_and_its_witnesses_say_so(trainers) -> None:
    results, sent, aggregate = _round(trainers, "trimmed_mean", lambda honest: torch.full_like(honest, math.nan))
    assert bool(torch.isfinite(aggregate).all())
    assert all(bool(torch.isfinite(p).all()) for p in trainers[0].global_params)
    _check_witnesses(trainers, results, sent, aggregate)
    attacker = trainers[ATTACKER].averager.peer_id.to_base58()
    witnesses = [w for r in results for w in r.witnesses]
    assert all(not w.finite for w in witnesses if w.sender_peer_id == attacker)
    assert all(w.finite for w in witnesses if w.sender_peer_id != attacker)
    assert math.isfinite(results[ATTACKER].local_norm)  # what it trained, and claims, was finite


def test_an_unknown_aggregation_is_refused(trainers) -> None:
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        trainers[0].set_aggregation("median")
    with pytest.raises(ValueError, match="unknown aggregation"):
        DiLoCoTrainer(build_model("tiny", VOCAB, seed=0),
                      dataclasses.replace(DiLoCoSettings(1e-2, 0.7, 0.9, "x", 2, 1.0, 1.0), aggregation="median"),
                      dht=None)  # type: ignore[arg-type]
