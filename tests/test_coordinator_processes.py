"""Several coordinator processes serving one port on one PostgreSQL database, as one coordinator."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from coordinator.accounting import accounting_problems
from coordinator.config import CoordinatorSettings
from coordinator.heartbeats import HeartbeatBuffer
from coordinator.shared_nonces import SharedNonces
from coordinator.store import Lease, RequestNonce, Worker, open_engine, session_factory, sqlite_url
from protocol import essaim_pb2 as pb
from protocol import essaim_pb2_grpc
from protocol.auth import sign_request
from protocol.identity import Identity
from protocol.limits import GRPC_OPTIONS
from worker.capabilities import Capabilities
from worker.client import CoordinatorClient

CPU = Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0)
CONNECTIONS = 16  # new TCP connections: the kernel hashes each to one of the processes


def fresh_stub(address: str) -> tuple[grpc.Channel, essaim_pb2_grpc.CoordinatorStub]:
    """A stub on a connection of its own (a channel argument no other channel has keeps gRPC from sharing one)."""
    fresh_stub.made = getattr(fresh_stub, "made", 0) + 1
    channel = grpc.insecure_channel(address, options=[*GRPC_OPTIONS, ("essaim.test.connection", fresh_stub.made)])
    return channel, essaim_pb2_grpc.CoordinatorStub(channel)


def test_two_processes_serve_one_run_and_refuse_a_replay_wherever_it_lands(start_coordinator, postgres) -> None:
    coordinator = start_coordinator(lease_seconds=30, database_url=postgres.create_database(),
                                    extra=("--processes", "2"))
    worker = Identity.generate()
    CoordinatorClient(coordinator.address, worker).register("w", "volunteer", CPU)  # at one process or the other

    answers = []
    for _ in range(CONNECTIONS):  # each process knows the worker, whichever registered it
        channel, stub = fresh_stub(coordinator.address)
        beat = stub.Heartbeat(sign_request("Heartbeat", pb.HeartbeatRequest(round=0), worker), timeout=10)
        answers.append(beat.current_round)
        channel.close()
    assert answers == [0] * CONNECTIONS

    channel, stub = fresh_stub(coordinator.address)
    asked = sign_request("AcquireLease", pb.AcquireLeaseRequest(max_tokens=256, round=0), worker)
    lease = stub.AcquireLease(asked, timeout=10).lease
    channel.close()
    refusals = []
    for _ in range(CONNECTIONS):
        channel, stub = fresh_stub(coordinator.address)
        with pytest.raises(grpc.RpcError) as replayed:
            stub.AcquireLease(asked, timeout=10)
        channel.close()
        assert replayed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "replayed request" in replayed.value.details()
        refusals.append(replayed.value.details())
    # Refused by the process that granted it (its memory) and by the other (the shared nonce): both served.
    assert any("at another process" in reason for reason in refusals), refusals
    assert any("at another process" not in reason for reason in refusals), refusals

    with coordinator.sessions()() as session:
        assert session.scalar(select(func.count(Lease.id))) == 1  # one grant, however often it was replayed
    report = pb.CompleteRoundRequest(round=0, loss=2.0, pseudo_gradient_digest="d" * 64, params_digest="p" * 64,
                                     group_size=1, leases=[pb.LeaseUsage(lease_id=lease.lease_id, tokens_consumed=256)])
    assert CoordinatorClient(coordinator.address, worker).complete_round(report).accepted
    assert accounting_problems(coordinator.sessions()) == []


def test_a_heartbeat_replayed_to_another_process_changes_nothing_and_a_failed_write_loses_no_beat(
    tmp_path: Path
) -> None:
    sessions = session_factory(open_engine(sqlite_url(tmp_path / "coordinator.db")))
    with sessions.begin() as session:
        session.add(Worker(id="w", public_key=b"k" * 32, name="w", institution="lab", device="cpu",
                           registered_at=0.0, last_seen=0.0))
    shared = SharedNonces(sessions)
    first, second = HeartbeatBuffer(shared_nonces=shared), HeartbeatBuffer(shared_nonces=shared)  # two processes'

    def write(buffer: HeartbeatBuffer, now: float) -> int:
        with sessions.begin() as session:
            written = buffer.write(session, 30.0, now)
        buffer.written()
        return written

    def seen() -> tuple[float, int]:
        with sessions() as session:
            worker = session.get(Worker, "w")
            return worker.last_seen, worker.last_round

    first.record("w", 1, 0.0, 5.0, 100.0, nonce=b"n" * 16, forget_nonce_at=500.0)
    second.record("w", 1, 0.0, 5.0, 160.0, nonce=b"n" * 16, forget_nonce_at=500.0)  # the same request, replayed
    assert (write(first, 100.0), write(second, 160.0)) == (1, 0)
    assert seen() == (100.0, 1)  # the replay did not make the worker look alive at 160

    first.record("w", 2, 0.0, 5.0, 200.0, nonce=b"m" * 16, forget_nonce_at=600.0)
    with pytest.raises(RuntimeError, match="the commit failed"):
        with sessions.begin() as session:
            first.write(session, 30.0, 200.0)
            raise RuntimeError("the commit failed")
    first.put_back()
    assert seen() == (100.0, 1)
    assert write(first, 201.0) == 1  # the beat was kept, and its nonce claimed again
    assert seen() == (200.0, 2)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(RequestNonce)) == 2
    write(first, 550.0)  # a nonce is forgotten once its timestamp is no longer acceptable
    with sessions() as session:
        assert session.scalars(select(RequestNonce.nonce)).all() == [b"m" * 16]


def test_several_processes_need_postgresql(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--processes 2 needs a PostgreSQL database"):
        CoordinatorSettings(data_dir=tmp_path, database_url=sqlite_url(tmp_path / "c.db"), processes=2)
    CoordinatorSettings(data_dir=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:5432/run", processes=2)
