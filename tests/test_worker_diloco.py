"""DiLoCoTrainer with real hivemind peers in one process: outer steps and state download."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from model.checkpoints import read_checkpoint, load_model
from model.presets import build_model
from model.tokenizer import train_tokenizer
from protocol import essaim_pb2 as pb
from protocol.swarm import Swarm
from support import outer_steps_together
from worker.checkpoint import restore_outer_state, save_checkpoint
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


def _train_apart(trainers: list[DiLoCoTrainer], vocab: int) -> None:
    """Different data per peer, so their pseudo-gradients differ."""
    for index, trainer in enumerate(trainers):
        batch = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(100 + index))
        trainer.inner_step(batch)


# Bytes each peer sends per round, as a share of what float32 would send. topk2bit's parts go up at about
# 14 bits per kept value (1/146 of float32 at density 1/64); its averages come back sparse, a union of the
# senders' supports at about 28 bits per nonzero, so they weigh most.
WIDTHS = {"none": (0.9, 1.2), "fp16": (0.45, 0.6), "8bit": (0.225, 0.3), "topk2bit": (0.005, 0.04)}


@pytest.mark.parametrize("compression", ["none", "fp16", "8bit", "topk2bit"])
def test_peers_of_a_group_end_a_compressed_round_with_identical_parameters(compression: str, tmp_path) -> None:
    swarms = [Swarm("127.0.0.1")]
    swarms += [Swarm("127.0.0.1", initial_peers=swarms[0].visible_addresses()) for _ in range(2)]
    settings = dataclasses.replace(
        SETTINGS, target_group_size=3, matchmaking_seconds=2.0, averaging_timeout_seconds=20.0,
        compression=compression, error_feedback=True,
    )
    trainers = [DiLoCoTrainer(build_model("tiny", 300, seed=0), settings, swarm.dht) for swarm in swarms]
    try:
        payload_bytes = sum(p.numel() * 4 for p in trainers[0].global_params)
        tokens = [64, 128, 192]
        for round_number in range(2):
            _train_apart(trainers, 300)
            start = [torch.cat([g.flatten() for g in t.global_params]) for t in trainers]
            local = [torch.cat([p.detach().flatten() for p in t.model.parameters()]) for t in trainers]
            carried = [_flat(t.averager.residuals) for t in trainers]  # error feedback resends these
            expected = sum(w * (g - p + r) for w, g, p, r in zip(tokens, start, local, carried)) / sum(tokens)
            results = outer_steps_together(trainers, tokens=tokens)
            assert [r.group_size for r in results] == [3, 3, 3], f"round {round_number}: {results}"
            assert len({r.params_digest for r in results}) == 1, "peers disagree after averaging"
            assert len({r.pseudo_gradient_digest for r in results}) == 1
            if round_number == 0:  # zero momentum: the step was outer_lr * (1 + momentum) * average
                after = torch.cat([g.flatten() for g in trainers[0].global_params])
                applied = (start[0] - after) / (settings.outer_lr * (1 + settings.outer_momentum))
                error = float((applied - expected).norm() / expected.norm())
                assert error < {"none": 1e-5, "fp16": 1e-3, "8bit": 0.05, "topk2bit": 1.0}[compression], error
                # What was applied plus what the peers kept back is what they had to send: each sent its
                # pseudo-gradient less its new residual (and the reducers averaged what they received).
                kept = sum(w * _flat(t.averager.residuals) for w, t in zip(tokens, trainers)) / sum(tokens)
                error = float((applied + kept - expected).norm() / expected.norm())
                assert error < {"none": 1e-5, "fp16": 1e-3, "8bit": 1e-3, "topk2bit": 2e-3}[compression], error
                if compression == "topk2bit":  # at most 3 senders' 64 values of each 4,096 (a little more in
                    assert float((applied != 0).float().mean()) < 0.06  # small tensors, at least 2 each)
            # Each peer sends about 2(N-1)/N of the payload, at the compression's width.
            sent = sum(r.bytes_sent for r in results) / 3
            low, high = WIDTHS[compression]
            assert low < sent / (payload_bytes * 4 / 3) < high, (compression, sent, payload_bytes)
        residual = sum(float(r.abs().sum()) for r in trainers[0].averager.residuals)
        assert (residual == 0.0) == (compression == "none")
        if compression == "topk2bit":  # what compression has not sent yet survives a checkpoint
            _residuals_survive_a_checkpoint(trainers[0], settings, tmp_path)
    finally:
        for trainer in trainers:
            trainer.shutdown()
        for swarm in swarms:
            swarm.close()


def _flat(tensors: list[torch.Tensor] | None) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors]) if tensors is not None else torch.zeros(())


def _residuals_survive_a_checkpoint(trainer: DiLoCoTrainer, settings: DiLoCoSettings, tmp_path) -> None:
    train_tokenizer(iter(["un petit texte", "a little text"] * 20), 300, tmp_path / "tokenizer")
    config = pb.RunConfig(run_id="test", tokenizer_json=(tmp_path / "tokenizer" / "tokenizer.json").read_bytes())
    saved = save_checkpoint(tmp_path / "checkpoints", trainer, config, lineage_head=0, config_version="v")
    assert saved.name == f"round-{trainer.round - 1:06d}"
    swarm = Swarm("127.0.0.1")
    restored = DiLoCoTrainer(load_model(read_checkpoint(saved)), settings, swarm.dht)
    try:
        assert float(_flat(restored.averager.residuals).abs().sum()) == 0.0
        restore_outer_state(restored, read_checkpoint(saved), round_started_at=0.0)
        assert torch.equal(_flat(restored.averager.residuals), _flat(trainer.averager.residuals))
        assert all(torch.equal(a, b) for a, b in zip(restored.momentum, trainer.momentum))
        with pytest.raises(ValueError, match="do not fit"):
            restored.load_residuals(restored.momentum[:1])
    finally:
        restored.shutdown()
        swarm.close()


def test_a_compression_set_between_rounds_applies_to_the_next_average(two_peers) -> None:
    first_swarm, second_swarm, trainers = two_peers
    settings = dataclasses.replace(SETTINGS, matchmaking_seconds=2.0, averaging_timeout_seconds=20.0)
    trainers += [DiLoCoTrainer(build_model("tiny", 300, seed=0), settings, swarm.dht)
                 for swarm in (first_swarm, second_swarm)]
    payload_bytes = sum(p.numel() * 4 for p in trainers[0].global_params)
    sent_per_round = []
    for compression in ("none", "8bit"):
        for trainer in trainers:
            trainer.set_compression(compression)  # what a vote does at its activation round
        _train_apart(trainers, 300)
        results = outer_steps_together(trainers, tokens=[64, 64])
        assert [r.group_size for r in results] == [2, 2], f"{compression}: {results}"
        assert len({r.params_digest for r in results}) == 1, f"{compression}: peers disagree after averaging"
        sent_per_round.append(sum(r.bytes_sent for r in results) / 2 / payload_bytes)
    # Two peers each send half the payload and get half back: 1.0 of it uncompressed, about a quarter in 8 bits.
    assert 0.9 < sent_per_round[0] < 1.2 and 0.2 < sent_per_round[1] < 0.3, sent_per_round
    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        trainers[0].set_compression("zip")


def test_a_run_that_asks_for_compile_trains_through_torch_compile_on_the_same_parameters(two_peers) -> None:
    # Compiling takes ~50 s on these CPUs, so this checks the wiring; benchmarks/overhead.py --compile trains compiled.
    first_swarm, _, trainers = two_peers
    trainer = DiLoCoTrainer(build_model("tiny", 300, seed=0), dataclasses.replace(SETTINGS, compile=True), first_swarm.dht)
    trainers.append(trainer)
    assert isinstance(trainer.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.forward_model._orig_mod is trainer.model
    assert trainer.inner_optimizer.param_groups[0]["params"][0] is next(trainer.model.parameters())


def test_overlapped_rounds_average_while_the_next_round_trains_and_peers_keep_identical_global_parameters(
        two_peers, tmp_path) -> None:
    first_swarm, second_swarm, trainers = two_peers
    trainers += [DiLoCoTrainer(build_model("tiny", 300, seed=0), SETTINGS, swarm.dht)
                 for swarm in (first_swarm, second_swarm)]
    for trainer in trainers:
        trainer.start_overlapping()
    tokens = [64, 192]
    _train_apart(trainers, 300)  # round 0's inner steps
    for round_number in range(2):
        start = [_flat(t.outer.round_start) for t in trainers]
        progress = [start_ - _flat(list(t.model.parameters())).detach() for start_, t in zip(start, trainers)]
        claims = [t.take_round_progress() for t in trainers]
        assert [norm for _, norm in claims] == pytest.approx([float(p.double().norm()) for p in progress])
        global_before = _flat(trainers[0].global_params).clone()
        for trainer, own in zip(trainers, progress):
            trainer.hand_over()  # the model: the newest global parameters plus its own round's progress
            assert torch.equal(_flat(list(trainer.model.parameters())).detach(), _flat(trainer.global_params) - own)

        results: list = [None, None]

        def average(index: int) -> None:
            results[index] = trainers[index].delayed_outer_step(tokens[index], threading.Event(), claims[index])

        threads = [threading.Thread(target=average, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        models_before = [_flat(list(t.model.parameters())).detach().clone() for t in trainers]
        _train_apart(trainers, 300)  # the next round trains while this one averages
        for thread in threads:
            thread.join(timeout=60)
        assert [r.group_size for r in results] == [2, 2], results
        assert [t.round for t in trainers] == [round_number + 1] * 2
        assert len({r.params_digest for r in results}) == 1, "peers disagree after a delayed outer step"
        assert all(torch.equal(a, b) for a, b in zip(*(t.global_params for t in trainers)))
        if round_number == 0:  # zero momentum: the step was outer_lr * (1 + momentum) * the weighted average
            expected = sum(w * p for w, p in zip(tokens, progress)) / sum(tokens)
            applied = (global_before - _flat(trainers[0].global_params)) / (SETTINGS.outer_lr * (1 + SETTINGS.outer_momentum))
            assert float((applied - expected).norm() / expected.norm()) < 1e-5
        # The outer step left the model alone: it went on from where the round handed over.
        for trainer, before in zip(trainers, models_before):
            moved = _flat(list(trainer.model.parameters())).detach()
            assert not torch.equal(moved, before) and not torch.equal(moved, _flat(trainer.global_params))
    # A checkpoint holds the global parameters the swarm kept, not the model's own progress; the model
    # goes on from where it was.
    trainer = trainers[0]
    train_tokenizer(iter(["un petit texte", "a little text"] * 20), 300, tmp_path / "tokenizer")
    config = pb.RunConfig(run_id="test", tokenizer_json=(tmp_path / "tokenizer" / "tokenizer.json").read_bytes())
    own = _flat(list(trainer.model.parameters())).detach().clone()
    with trainer.global_params_in_model():
        saved = save_checkpoint(tmp_path / "checkpoints", trainer, config, lineage_head=0, config_version="v")
    assert torch.equal(_flat(list(trainer.model.parameters())).detach(), own)
    restored = load_model(read_checkpoint(saved))
    assert torch.equal(_flat([p for p in restored.parameters() if p.requires_grad]).detach(),
                       _flat(trainer.global_params))
