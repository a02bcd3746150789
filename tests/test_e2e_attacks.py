"""A registered stranger attacks a live run (real coordinator, real workers) and changes nothing.

It reports the last round on a round-0 lease (to end the run), reports a future round, reports
first with made-up parameters (to decide which model a round keeps) and hoards leases without
reporting. Each is refused or contained with its rule named; the honest workers finish every
round on one set of parameters, the accounting invariant holds, and the stranger is credited
with no token. (Attacks on the averaging itself, by peers with and without credentials, are in
test_worker_peer_admission.py.)
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from coordinator.accounting import accounting_problems
from coordinator.store import LineageRecord
from protocol import essaim_pb2 as pb
from protocol.identity import Identity
from support import contributions_by_round, logs, start_worker, wait_all, wait_for
from worker.capabilities import Capabilities
from worker.client import CoordinatorClient, CoordinatorRefused

pytestmark = pytest.mark.e2e

ROUNDS = 6
RUN = dict(total_rounds=ROUNDS, target_group_size=2, inner_steps=30, batch_size=4, seq_len=64, lease_seconds=5,
           heartbeat_seconds=1, matchmaking_seconds=2.0, averaging_timeout_seconds=10.0)


def _report(round_number: int, lease: pb.Lease, digest: str) -> pb.CompleteRoundRequest:
    return pb.CompleteRoundRequest(round=round_number, leases=[pb.LeaseUsage(lease_id=lease.lease_id,
                                                                             tokens_consumed=lease.end - lease.start)],
                                   loss=1.0, pseudo_gradient_digest="d" * 64, params_digest=digest, group_size=1)


def _lease(stranger: CoordinatorClient) -> pb.Lease:
    """A lease in the open round (asked again if the round closes in between)."""
    while True:
        round_number = stranger.heartbeat(0, 0.0, 1.0).current_round
        reply = stranger.acquire_lease(1, round_number)
        if reply.status == pb.AcquireLeaseReply.GRANTED:
            return reply.lease
        time.sleep(0.1)


def test_a_registered_stranger_can_neither_end_steer_nor_hoard_a_run(start_coordinator, tmp_path: Path) -> None:
    coordinator = start_coordinator(**RUN)
    honest = [start_worker(coordinator, tmp_path, f"h{i}") for i in range(2)]
    stranger = CoordinatorClient(coordinator.address, Identity.generate(), retry_seconds=10)
    outcomes: dict[str, str] = {}
    try:
        # The run is under way (the very first worker of a run decides its rounds alone, whoever it is).
        wait_for(lambda: all("first inner step" in (tmp_path / f"h{i}.log").read_text() for i in range(2)), 120,
                 "the honest workers training")
        stranger.register("mallory", "independent", Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0))
        lease = _lease(stranger)
        assert lease.end - lease.start == RUN["seq_len"]  # asked for 1 token: got the smallest lease, one row

        with pytest.raises(CoordinatorRefused, match=f"round {ROUNDS - 1} is not open") as ended:
            stranger.complete_round(_report(ROUNDS - 1, lease, "e" * 64))  # "the run is over"
        outcomes["end the run"] = ended.value.code.name
        with pytest.raises(CoordinatorRefused, match="is not open") as ahead:
            stranger.complete_round(_report(lease.round + 1, lease, "f" * 64))  # "the swarm moved on"
        outcomes["future round"] = ahead.value.code.name
        assert stranger.heartbeat(0, 0.0, 1.0).current_round < ROUNDS  # the run goes on

        # Steer: report first, with parameters no group has, on the lease it holds in the open round.
        lease = _lease(stranger)
        steer = stranger.complete_round(_report(lease.round, lease, "5" * 64))  # polls until decided
        assert not steer.accepted and steer.round_params_digest not in ("", "5" * 64)
        outcomes["report first"] = "not kept"

        # Hoard: lease until the coordinator says one worker may hold no more, and never report.
        statuses = []
        for _ in range(200):
            reply = stranger.acquire_lease(10**9, stranger.heartbeat(0, 0.0, 1.0).current_round)
            statuses.append(reply.status)
            if reply.status == pb.AcquireLeaseReply.AT_LIMIT:
                break
        assert statuses[-1] == pb.AcquireLeaseReply.AT_LIMIT, statuses
        outcomes["hoard"] = f"AT_LIMIT after {len(statuses) - 1} leases"
        wait_all(honest, timeout=400)  # the hoarder stops heartbeating here: its leases expire
    finally:
        stranger.close()
        for worker in honest:
            worker.kill() if worker.poll() is None else None
    assert [w.returncode for w in honest] == [0, 0], logs(tmp_path, "h0", "h1")

    sessions = coordinator.sessions()
    by_round = contributions_by_round(sessions)
    assert sorted(by_round) == list(range(ROUNDS)), (outcomes, logs(tmp_path, "h0", "h1"))
    for number, rows in by_round.items():
        assert len({c.params_digest for c in rows}) == 1, f"round {number}: {rows}"
    with sessions() as session:
        credited = session.scalar(select(func.coalesce(func.sum(LineageRecord.end - LineageRecord.start), 0))
                                  .where(LineageRecord.worker_id == stranger.identity.worker_id))
    assert credited == 0
    time.sleep(RUN["lease_seconds"] + 2)  # the hoarded leases pass their deadline
    assert accounting_problems(sessions) == []
    assert outcomes["end the run"] == outcomes["future round"] == grpc.StatusCode.FAILED_PRECONDITION.name
