"""DiLoCoTrainer with real hivemind peers in one process: outer steps and state download."""

from __future__ import annotations

import threading

import pytest
import torch

from model.presets import build_model
from protocol.swarm import Swarm
from worker.diloco import DiLoCoSettings, DiLoCoTrainer

SETTINGS = DiLoCoSettings(inner_lr=1e-2, outer_lr=0.7, outer_momentum=0.9, dht_prefix="test",
                          target_group_size=2, matchmaking_seconds=1.0, averaging_timeout_seconds=3.0)


@pytest.fixture
def two_peers():
    first = Swarm("127.0.0.1")
    second = Swarm("127.0.0.1", initial_peers=first.visible_addresses())
    trainers: list[DiLoCoTrainer] = []
    yield first, second, trainers
    for trainer in trainers:
        trainer.shutdown()
    second.close()
    first.close()


def test_a_late_peer_downloads_round_parameters_and_momentum(two_peers) -> None:
    first_swarm, second_swarm, trainers = two_peers
    veteran = DiLoCoTrainer(build_model("tiny", 300, seed=0), SETTINGS, first_swarm.dht)
    trainers.append(veteran)
    batch = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    before = [p.clone() for p in veteran.global_params]
    veteran.inner_step(batch)
    result = veteran.outer_step(tokens_trained=64, cancel=threading.Event())  # nobody to average with
    assert (result.round, result.group_size, veteran.round) == (0, 1, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, veteran.global_params))
    assert any(m.abs().sum() > 0 for m in veteran.momentum)

    newcomer = DiLoCoTrainer(build_model("tiny", 300, seed=7), SETTINGS, second_swarm.dht)
    trainers.append(newcomer)
    assert newcomer.load_state_from_peers(timeout=20)
    assert newcomer.round == 1
    assert all(torch.equal(a, b) for a, b in zip(newcomer.global_params, veteran.global_params))
    assert all(torch.equal(a, b) for a, b in zip(newcomer.momentum, veteran.momentum))
    assert all(torch.equal(p, g) for p, g in zip(newcomer.model.parameters(), veteran.global_params))
