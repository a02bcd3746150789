"""Workers that die, are stopped, or meet bad data: leases come back and nothing is left running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator.accounting import accounting_problems
from coordinator.store import Lease
from essaim.processes import essaim_command, group_alive, group_members, kill_group
from protocol.identity import Identity
from support import start_worker, wait_for
from worker.capabilities import Capabilities
from worker.client import CoordinatorClient

CPU = Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0)  # a worker that declares little

pytestmark = pytest.mark.e2e

# Rounds long enough that the worker is surely mid-lease when the test strikes.
SLOW_ROUND = dict(total_rounds=50, target_group_size=2, inner_steps=400, batch_size=4, seq_len=64,
                  lease_seconds=5, heartbeat_seconds=1)


def granted_lease(sessions) -> Lease | None:  # type: ignore[no-untyped-def]
    """The first lease still out (a worker takes several to fill a round)."""
    with sessions() as session:
        return session.scalars(select(Lease).where(Lease.state == "granted").order_by(Lease.id)).first()


def lease_state(sessions, lease_id: int) -> str:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return session.get(Lease, lease_id).state


def test_killed_worker_lease_expires_and_its_tokens_return_to_the_pool(start_coordinator, tmp_path: Path):
    coordinator = start_coordinator(**SLOW_ROUND)
    sessions = coordinator.sessions()
    socket_parent = Path(tempfile.mkdtemp(prefix="ess-", dir="/tmp"))  # short: unix socket paths
    worker = start_worker(coordinator, tmp_path, "doomed", env={"ESSAIM_SOCKET_DIR": str(socket_parent)})
    try:
        lease = wait_for(lambda: granted_lease(sessions), 90, "a lease")
        os.kill(worker.pid, signal.SIGKILL)  # the agent only, as a crash would
        worker.wait(timeout=10)
        assert wait_for(lambda: lease_state(sessions, lease.id) == "expired", 30, "the lease to expire")
        # Its later leases may expire a pass later; until they do, their sources count as
        # taken and the mixture would rightly send the rescuer elsewhere.
        assert wait_for(lambda: granted_lease(sessions) is None, 30, "all its leases to expire")
        assert accounting_problems(sessions) == []

        # With every token back, the first range is leased again, to someone else.
        client = CoordinatorClient(coordinator.address, Identity.generate())
        client.register("rescuer", "volunteer", CPU)
        again = client.acquire_lease(lease.end - lease.start, 0).lease
        assert (again.shard_id, again.start, again.end) == (lease.shard_id, lease.start, lease.end)
        client.close()
    finally:
        kill_group(worker)
        shutil.rmtree(socket_parent)  # a killed worker cannot remove its sockets itself
    assert group_members(worker.pid) == []


def test_sigterm_releases_the_lease_and_leaves_no_process(start_coordinator, tmp_path: Path):
    coordinator = start_coordinator(**SLOW_ROUND)
    sessions = coordinator.sessions()
    socket_parent = Path(tempfile.mkdtemp(prefix="ess-", dir="/tmp"))
    worker = start_worker(coordinator, tmp_path, "preempted", env={"ESSAIM_SOCKET_DIR": str(socket_parent)})
    try:
        lease = wait_for(lambda: granted_lease(sessions), 90, "a lease")
        os.kill(worker.pid, signal.SIGTERM)  # what Slurm sends before the walltime
        assert worker.wait(timeout=30) == 0, (tmp_path / "preempted.log").read_text()[-3000:]
        assert lease_state(sessions, lease.id) == "released"
        # hivemind's DHT, averager and p2pd go down with the agent, without help.
        assert wait_for(lambda: not group_alive(worker.pid), 20, "the worker's processes to exit")
        assert list(socket_parent.iterdir()) == [], "the worker left hivemind sockets behind"
        assert accounting_problems(sessions) == []
    finally:
        kill_group(worker)
        shutil.rmtree(socket_parent)


def test_corrupted_shard_is_refused_and_its_lease_released(start_coordinator, tmp_path: Path, corpus_dir: Path):
    coordinator = start_coordinator(**SLOW_ROUND)
    sessions = coordinator.sessions()
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus_dir, damaged, ignore=shutil.ignore_patterns("*.db*"))
    for shard in damaged.glob("*.bin"):
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    worker = start_worker(coordinator, tmp_path, "unlucky", "--data", str(damaged))
    try:
        assert worker.wait(timeout=90) == 2
    finally:
        kill_group(worker)
    log = (tmp_path / "unlucky.log").read_text()
    assert "sha256" in log and ".bin" in log
    with sessions() as session:
        states = [lease.state for lease in session.scalars(select(Lease))]
    assert states and set(states) == {"released"}  # the round's leases (fetched side by side), none expired
    assert accounting_problems(sessions) == []


def test_a_coordinator_that_does_not_answer_gives_a_clear_error(tmp_path: Path):
    result = subprocess.run(
        essaim_command("worker", "join", "--coordinator", "127.0.0.1:9", "--connect-seconds", "1",
                       "--identity", str(tmp_path / "w.key")),
        capture_output=True, text=True, timeout=120, start_new_session=True,
    )
    assert result.returncode == 2
    assert "no coordinator answers at 127.0.0.1:9" in result.stderr


def test_a_worker_at_the_end_of_its_allocation_calibrates_leases_nothing_and_leaves(
    start_coordinator, tmp_path: Path
) -> None:
    import time

    from coordinator.store import Worker

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocol.certificates import certify

    centre = Ed25519PrivateKey.generate()  # an HPC centre the run admits, certifying this worker as hpc
    certificate = certify("GENCI", centre, Identity.load_or_create(tmp_path / "leaving.key").public_key, "hpc",
                          int(time.time()) + 3600)
    (tmp_path / "leaving.cert").write_bytes(certificate.to_bytes())
    coordinator = start_coordinator(**SLOW_ROUND, extra=(f"--admit-institution=GENCI={certificate.institution_key}",))
    ends = time.time() + 30  # inside the coordinator's drain period: no lease can be trained in time
    worker = start_worker(coordinator, tmp_path, "leaving", "--certificate", str(tmp_path / "leaving.cert"),
                          "--available-until", str(ends))
    assert worker.wait(timeout=120) == 0, (tmp_path / "leaving.log").read_text()[-2000:]
    log = (tmp_path / "leaving.log").read_text()
    assert "calibrated at" in log and "the allocation ends soon" in log
    with coordinator.sessions()() as session:
        [registered] = session.scalars(select(Worker)).all()
        assert (registered.trust_class, registered.institution) == ("hpc", "GENCI")
        assert registered.available_until == pytest.approx(ends)
        assert registered.tokens_per_second > 0
        assert session.scalars(select(Lease)).all() == []
