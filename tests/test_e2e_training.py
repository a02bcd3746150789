"""A coordinator and two real worker processes train DiLoCo rounds over hivemind on loopback."""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.accounting import accounting_problems
from coordinator.store import Contribution, Evaluation, LineageRecord, Round, Worker
from essaim.processes import group_alive, start_role
from model.checkpoints import latest_checkpoint
from model.evaluate import mean_loss
from model.presets import build_model
from model.shards import Manifest, read_tokens
from protocol.swarm import free_port
from support import logs, wait_all
from http_views import WATCH_TIMEOUT, watch_the_dashboard_through_a_round

pytestmark = pytest.mark.e2e

ROUNDS = 3


def kept_round_metrics(port: int) -> dict[str, float] | None:
    """The worker's metrics once it has kept a round ("name{labels}" -> value), else None (none yet, or not serving)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples = {sample.name + "".join(f'{{{k}="{v}"}}' for k, v in sample.labels.items()): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    return samples if samples.get('essaim_worker_rounds_total{outcome="kept"}', 0) >= 1 else None


def scrape_while_it_serves(port: int, stop: threading.Event) -> dict[str, float] | None:
    """The last scrape of a worker's metrics that showed a kept round, polled until ``stop``: a short run
    may end (and its worker stop serving) at any moment, so the scrape cannot wait for a later point."""
    latest = None
    while not stop.wait(0.5):
        latest = kept_round_metrics(port) or latest
    return latest


def fixed_sample(corpus_dir: Path) -> torch.Tensor:
    manifest = Manifest.load(corpus_dir / "manifest.json")
    return torch.cat(
        [torch.from_numpy(read_tokens(corpus_dir / s.file, s.dtype, 0, 512)) for s in manifest.shards[:3]]
    )


PRECISIONS = ("fp32", "bf16")  # bf16 autocast runs on the CPU too: a GPU worker's precision, tested in CI


def test_two_workers_in_different_precisions_train_compressed_rounds_together_and_end_identical(
    start_coordinator, tmp_path: Path, corpus_dir: Path
):
    dashboard_port = free_port("127.0.0.1", 0)
    coordinator = start_coordinator(
        total_rounds=ROUNDS, target_group_size=2, inner_steps=10, batch_size=4, seq_len=64,
        inner_lr=0.003, matchmaking_seconds=5.0, heartbeat_seconds=1, compression="8bit", error_feedback=True,
        eval_every_rounds=1, extra=("--dashboard-port", str(dashboard_port)),
    )
    metrics_port = free_port("127.0.0.1", 0)
    background = ThreadPoolExecutor(max_workers=2)
    # The run's web page in a real browser while it trains: charts and numbers, redrawn after a round. Open and
    # drawn before the workers start, so that however fast the run goes the page sees a round and the next one.
    page_opened = threading.Event()
    watching = background.submit(watch_the_dashboard_through_a_round, f"http://127.0.0.1:{dashboard_port}/",
                                 ROUNDS, workers=2, opened=page_opened)
    while not page_opened.wait(0.5):
        if watching.done():
            watching.result()  # raises why the page never drew itself
    workers = [
        start_role(
            ["worker", "join", "--coordinator", coordinator.address, "--name", f"w{i}",
             "--identity", str(tmp_path / f"w{i}.key"), "--checkpoint-dir", str(tmp_path / f"ckpt{i}"),
             "--device", "cpu", "--precision", PRECISIONS[i],
             *(["--metrics-port", str(metrics_port), "--grid-intensity", "50"] if i == 0 else [])],
            tmp_path / f"w{i}.log",
            env={"OMP_NUM_THREADS": "1"},
        )
        for i in range(2)
    ]
    # w0's own metrics, scraped while it trains: a kept round, its tokens and its energy.
    scraping_done = threading.Event()
    scraping = background.submit(scrape_while_it_serves, metrics_port, scraping_done)
    wait_all(workers, timeout=240)
    scraping_done.set()
    watching.result(timeout=2 * WATCH_TIMEOUT)  # raises what the browser saw wrong
    scraped = scraping.result(timeout=10)
    background.shutdown()
    assert scraped is not None, "w0's metrics never showed a kept round"
    assert scraped["essaim_worker_tokens_trained_total"] > 0 and scraped["essaim_worker_bytes_sent_total"] > 0
    assert sum(v for k, v in scraped.items() if k.startswith("essaim_worker_energy_joules_total")) > 0
    assert [w.returncode for w in workers] == [0, 0], logs(tmp_path, "w0", "w1")
    # A clean exit takes hivemind down with it: nothing of either worker is left.
    assert not any(group_alive(w.pid) for w in workers)

    sessions = coordinator.sessions()
    with sessions() as session:
        rounds = session.scalars(select(Round).order_by(Round.number)).all()
        assert [(r.number, r.reports, r.max_group_size) for r in rounds] == [(n, 2, 2) for n in range(ROUNDS)], \
            logs(tmp_path, "w0", "w1")
        for number in range(ROUNDS):
            digests = {r.pseudo_gradient_digest for r in session.scalars(
                select(LineageRecord).where(LineageRecord.round == number))}
            assert len(digests) == 1, f"round {number}: workers applied different averages"
            contributions = session.scalars(select(Contribution).where(Contribution.round == number)).all()
            assert len({c.params_digest for c in contributions}) == 1, f"round {number}: parameters differ"
            assert all(c.bytes_sent > 0 and 0 < c.inner_seconds < c.wall_seconds for c in contributions)
        # Lineage says which hardware and precision trained each range.
        trained_in = {(r.worker_id, r.device.split()[0], r.precision) for r in session.scalars(select(LineageRecord))}
        assert {precision for _, _, precision in trained_in} == set(PRECISIONS) and len(trained_in) == 2
        assert {device for _, device, _ in trained_in} == {"cpu"}
        # Each round's energy, as its worker measured it, and its lineage records' shares of it by tokens.
        for contribution in session.scalars(select(Contribution)):
            # On the CPU: RAPL where this host lets it be read, else an estimate.
            assert contribution.energy_method in ("rapl", "estimate") and contribution.energy_joules > 0
            shares = session.scalars(select(LineageRecord.energy_joules).where(
                LineageRecord.round == contribution.round, LineageRecord.worker_id == contribution.worker_id)).all()
            assert sum(shares) == pytest.approx(contribution.energy_joules)
        assert sorted(session.scalars(select(Worker.grid_gco2_per_kwh))) == [0.0, 50.0]
        # Held-out figures of each round's kept parameters, from one member of its group (worker/evaluation.py).
        overall = session.scalars(select(Evaluation).where(Evaluation.group == "all").order_by(Evaluation.round)).all()
        assert [(e.round, e.params_digest) for e in overall] == [(r.number, r.params_digest) for r in rounds]
        assert overall[-1].bits_per_byte < overall[0].bits_per_byte
        assert session.scalar(select(func.count(Evaluation.id)).where(Evaluation.group == "language")) >= ROUNDS
    assert accounting_problems(sessions) == []

    checkpoints = [latest_checkpoint(tmp_path / f"ckpt{i}") for i in range(2)]
    assert [c.name for c in checkpoints] == [f"round-{ROUNDS - 1:06d}"] * 2
    first, second = (load_file(c / "model.safetensors") for c in checkpoints)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)

    trained = AutoModelForCausalLM.from_pretrained(checkpoints[0])
    AutoTokenizer.from_pretrained(checkpoints[0])
    initial = build_model("tiny", Manifest.load(corpus_dir / "manifest.json").vocab_size, seed=0)
    sample = fixed_sample(corpus_dir)
    assert mean_loss(trained, sample, 64) < mean_loss(initial, sample, 64) - 0.1
