"""A run across separate hosts: a coordinator and three workers in four network namespaces (tests/wanemu.py).

Each worker starts with an empty data directory and fetches its shards from the coordinator
over TLS, pinned by fingerprint; one worker cannot be reached from outside its namespace and
averages in client mode. Namespaces need root (CI is root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from coordinator.accounting import accounting_problems
from coordinator.store import Contribution, LineageRecord, Round, open_engine, session_factory, sqlite_url
from essaim.processes import group_alive, kill_group, start_role, stop_group, wait_for_ready_file
from protocol.transport import write_self_signed
from support import wait_all

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="network namespaces need root and iproute2 (CI has both)"),
]

WANEMU = Path(__file__).with_name("wanemu.py")
PREFIX, SUBNET = "essaimt", "10.213.9"
ROUNDS = 3


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[str]]:
    """Four namespaces essaimt0..3 with addresses 10.213.9.1..4, 5 ms apart at 100 Mbit/s."""
    def wanemu(*args: str) -> None:
        done = subprocess.run([sys.executable, str(WANEMU), *args, "--prefix", PREFIX], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    subprocess.run([sys.executable, str(WANEMU), "down", "--prefix", PREFIX], capture_output=True)  # a crashed run's
    wanemu("up", "-n", "4", "--delay-ms", "5", "--rate-mbit", "100", "--subnet", SUBNET)
    try:
        yield [f"{SUBNET}.{i + 1}" for i in range(4)]
    finally:
        wanemu("down")


def on_host(i: int) -> list[str]:
    return ["ip", "netns", "exec", f"{PREFIX}{i}"]


def test_workers_on_three_hosts_fetch_their_shards_over_tls_and_average_every_round_together(
    hosts: list[str], corpus_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "served"
    shutil.copytree(corpus_dir, data, ignore=shutil.ignore_patterns("coordinator.db*"))
    cert, key = write_self_signed(tmp_path / "tls", [hosts[0]])
    (tmp_path / "run.toml").write_text(
        f"total_rounds = {ROUNDS}\ntarget_group_size = 3\ninner_steps = 6\nbatch_size = 4\nseq_len = 64\n"
        "matchmaking_seconds = 5.0\nheartbeat_seconds = 1\nlease_seconds = 60\n")
    database = sqlite_url(tmp_path / "coordinator.db")
    processes = []
    try:
        coordinator = start_role(
            ["coordinator", "serve", "--data", str(data), "--database", database, "--host", hosts[0],
             "--port", "50051", "--dht-port", "50052", "--tls-cert", str(cert), "--tls-key", str(key),
             "--run", str(tmp_path / "run.toml"), "--ready-file", str(tmp_path / "ready.json")],
            tmp_path / "coordinator.log", wrapper=on_host(0))
        processes.append(coordinator)
        ready = wait_for_ready_file(coordinator, tmp_path / "ready.json", tmp_path / "coordinator.log", timeout=90)
        assert ready["address"] == f"{hosts[0]}:50051" and ready["fingerprint"].startswith("sha256:")

        def join(i: int, *extra: str) -> subprocess.Popen[bytes]:
            return start_role(
                ["worker", "join", "--coordinator", ready["address"], "--name", f"w{i}",
                 "--identity", str(tmp_path / f"w{i}.key"), "--data", str(tmp_path / f"w{i}-data"),
                 "--device", "cpu", *extra],
                tmp_path / f"w{i}.log", env={"OMP_NUM_THREADS": "1"}, wrapper=on_host(i))

        pinned = ("--coordinator-fingerprint", ready["fingerprint"])
        workers = [join(1, *pinned, "--host", hosts[1]), join(2, *pinned, "--host", "0.0.0.0"),
                   join(3, *pinned, "--host", "127.0.0.1")]  # w3 listens on its own loopback only: unreachable
        processes += workers
        wait_all(workers, timeout=400)
        logs = {i: (tmp_path / f"w{i}.log").read_text() for i in (1, 2, 3)}
        assert [w.returncode for w in workers] == [0, 0, 0], "\n".join(text[-3000:] for text in logs.values())
        assert "averages as a client-mode peer" in logs[3]
        assert "client-mode" not in logs[1] and "client-mode" not in logs[2]
        assert not any(group_alive(w.pid) for w in workers)  # hivemind went down with each worker

        sessions = session_factory(open_engine(database))
        with sessions() as session:
            rounds = session.scalars(select(Round).order_by(Round.number)).all()
            assert [(r.number, r.reports, r.max_group_size) for r in rounds] == [(n, 3, 3) for n in range(ROUNDS)]
            for number in range(ROUNDS):
                contributions = session.scalars(select(Contribution).where(Contribution.round == number)).all()
                assert len({c.params_digest for c in contributions}) == 1, f"round {number}: parameters differ"
                digests = {r.pseudo_gradient_digest for r in session.scalars(
                    select(LineageRecord).where(LineageRecord.round == number))}
                assert len(digests) == 1, f"round {number}: workers applied different averages"
            trained = {(r.worker_id, r.shard_id) for r in session.scalars(select(LineageRecord))}
        assert accounting_problems(sessions) == []
        for i in (1, 2, 3):  # each fetched what it trained, verified, into its empty directory
            fetched = list((tmp_path / f"w{i}-data").glob("chunks/*/*.chunk"))
            assert fetched and not list((tmp_path / f"w{i}-data").glob("*.bin")), f"w{i} fetched nothing"
        assert len({worker for worker, _ in trained}) == 3

        # `essaim status` from another host, over TLS, pinned.
        status = subprocess.run([*on_host(2), sys.executable, "-m", "essaim", "status", "--coordinator",
                                 ready["address"], "--coordinator-fingerprint", ready["fingerprint"], "--once"],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and f"round {ROUNDS}/{ROUNDS}" in status.stdout, status.stderr

        # A wrong pin, or no pin at all, and the worker refuses to talk to the coordinator.
        wrong = join(1, "--coordinator-fingerprint", "sha256:" + "0" * 64, "--host", hosts[1])
        plain = join(2, "--host", hosts[2])
        processes += [wrong, plain]
        assert wrong.wait(timeout=120) != 0 and plain.wait(timeout=120) != 0
        assert "not the one you pinned" in (tmp_path / "w1.log").read_text()
        assert "--coordinator-fingerprint" in (tmp_path / "w2.log").read_text().splitlines()[-1]
    finally:
        for process in processes:
            stop_group(process)
            if process.poll() is None:
                kill_group(process)
    assert not any(group_alive(p.pid) for p in processes)
