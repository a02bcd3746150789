"""Refusals over real gRPC: a coordinator process, requests built by hand."""

from __future__ import annotations

import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from coordinator.store import Lease, Worker
from protocol import essaim_pb2 as pb
from protocol import essaim_pb2_grpc
from protocol.auth import sign_request
from protocol.certificates import certify
from protocol.identity import Identity
from protocol.limits import MAX_MESSAGE_BYTES
from worker.capabilities import Capabilities
from worker.client import CoordinatorClient, CoordinatorRefused

CPU = Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0)  # a worker that declares little
GENCI = Ed25519PrivateKey.generate()  # an institution the coordinator admits by its key


def genci_certificate(identity: Identity) -> bytes:
    return certify("GENCI", GENCI, identity.public_key, "hpc", int(time.time()) + 3600).to_bytes()


@pytest.fixture
def coordinator(start_coordinator):
    key = certify("GENCI", GENCI, b"\0" * 32, "hpc", 0).institution_key
    return start_coordinator(lease_seconds=30, extra=(f"--admit-institution=GENCI={key}",))


def refusal(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=5)
    return caught.value


def test_bad_requests_are_refused_with_reasons_and_change_nothing(coordinator) -> None:
    # The client may send more than the server accepts, so the server's limit is what is tested.
    channel = grpc.insecure_channel(coordinator.address, options=[("grpc.max_send_message_length", -1)])
    stub = essaim_pb2_grpc.CoordinatorStub(channel)
    honest = Identity.generate()
    client = CoordinatorClient(coordinator.address, honest)
    client.register("honest", "Inria", CPU)
    assert client.run_config().vocab_size == 512

    unsigned = pb.AcquireLeaseRequest(max_tokens=100)
    unsigned.auth.worker_id = honest.worker_id
    error = refusal(stub.AcquireLease, unsigned)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "not signed" in error.details()

    forged = sign_request("AcquireLease", pb.AcquireLeaseRequest(max_tokens=100), Identity.generate())
    forged.auth.worker_id = honest.worker_id
    error = refusal(stub.AcquireLease, forged)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "bad signature" in error.details()

    stranger = sign_request("AcquireLease", pb.AcquireLeaseRequest(max_tokens=100), Identity.generate())
    error = refusal(stub.AcquireLease, stranger)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown worker" in error.details()

    raw = channel.unary_unary("/essaim.v1.Coordinator/AcquireLease")
    error = refusal(raw, b"\x0a\xff\xff\xff garbage")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed AcquireLeaseRequest" in error.details()

    oversized = b"\x00" * (MAX_MESSAGE_BYTES + 1)
    error = refusal(raw, oversized)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    squatter = Identity.generate()
    register = pb.RegisterRequest(public_key=honest.public_key, name="squatter")
    sign_request("Register", register, squatter)
    error = refusal(stub.Register, register)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    granted = sign_request("AcquireLease", pb.AcquireLeaseRequest(max_tokens=100), honest)
    assert stub.AcquireLease(granted, timeout=5).status == pb.AcquireLeaseReply.GRANTED
    error = refusal(stub.AcquireLease, granted)  # the same bytes again
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed" in error.details()

    other = Identity.generate()
    CoordinatorClient(coordinator.address, other).register("other", "volunteer", CPU)
    steal = pb.CompleteRoundRequest(round=0, leases=[pb.LeaseUsage(lease_id=1, tokens_consumed=10)])
    with pytest.raises(Exception, match="belongs to another worker"):
        CoordinatorClient(coordinator.address, other).complete_round(steal)

    # A NaN stored with a report would fail its round's decision for every reporter: refused at the edge.
    nan = pb.CompleteRoundRequest(round=0, leases=[pb.LeaseUsage(lease_id=1, tokens_consumed=10)], loss=float("nan"))
    with pytest.raises(CoordinatorRefused, match="loss is nan, not a finite number") as refused:
        client.complete_round(nan)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(CoordinatorRefused, match="tokens_per_second is inf, not a finite number"):
        client.heartbeat(0, 0.0, float("inf"))
    for energy, reason in ((pb.RoundEnergy(joules=-1.0, method="estimate"), "energy.joules is -1.0: send what"),
                           (pb.RoundEnergy(joules=float("inf"), method="nvml"), "energy.joules is inf"),
                           (pb.RoundEnergy(joules=5.0), "energy.method is '': say how the joules were obtained"),
                           (pb.RoundEnergy(joules=5.0, method="guess"), "energy.method is 'guess'.*nvml, rapl, estimate")):
        with pytest.raises(CoordinatorRefused, match=reason) as refused:
            client.complete_round(pb.CompleteRoundRequest(
                round=0, leases=[pb.LeaseUsage(lease_id=1, tokens_consumed=10)], energy=energy))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT

    # The server still serves, and only the honest calls left a trace.
    assert client.heartbeat(0, 0.0, 0.0).live_workers == 2
    with coordinator.sessions()() as session:
        assert session.scalar(select(func.count(Lease.id))) == 1
        assert session.get(Lease, 1).state == "granted"
        assert {w.name for w in session.scalars(select(Worker))} == {"honest", "other"}
    channel.close()


def test_a_silent_address_gives_a_clear_error_quickly() -> None:
    from worker.client import CoordinatorUnreachable

    client = CoordinatorClient("127.0.0.1:9", Identity.generate(), retry_seconds=1.0, call_timeout=0.5)
    with pytest.raises(CoordinatorUnreachable, match="no coordinator answers at 127.0.0.1:9"):
        client.register("w", "i", CPU)


def test_register_records_capabilities_and_refuses_an_unknown_trust_class(coordinator) -> None:
    from coordinator.store import Worker
    from worker.capabilities import detect
    from worker.device import plan_device

    identity, claimant = Identity.generate(), Identity.generate()
    client = CoordinatorClient(coordinator.address, identity)
    declared = detect(plan_device("cpu", "bf16"), "hpc", available_until=1_900_000_000.0, bandwidth_mbit=100.0)
    client.register("node-7", "GENCI", declared, genci_certificate(identity), grid_gco2_per_kwh=56.0)
    CoordinatorClient(coordinator.address, claimant).register("pc", "GENCI", declared)  # the same claims, no certificate
    with coordinator.sessions()() as session:
        worker = session.get(Worker, identity.worker_id)
        assert (worker.device, worker.memory_bytes, worker.trust_class) == (declared.device, declared.memory_bytes, "hpc")
        assert (worker.available_until, worker.bandwidth_mbit, worker.precision) == (1_900_000_000.0, 100.0, "bf16")
        assert (worker.institution, worker.grid_gco2_per_kwh) == ("GENCI", 56.0)
        claimed = session.get(Worker, claimant.worker_id)
        assert (claimed.institution, claimed.trust_class) == ("independent", "volunteer")
    assert declared.device.startswith("cpu ") and declared.memory_bytes > 2**30
    with pytest.raises(CoordinatorRefused, match="trust_class 'friend' is not one of hpc, institution, volunteer"):
        CoordinatorClient(coordinator.address, Identity.generate()).register(
            "x", "y", Capabilities("cpu", 0, "friend", 0.0, "", 0.0))
    with pytest.raises(CoordinatorRefused, match="precision 'fp8' is not one of fp32, bf16"):
        CoordinatorClient(coordinator.address, Identity.generate()).register(
            "x", "y", Capabilities("cpu", 0, "volunteer", 0.0, "", 0.0, "fp8"))
    for intensity in (-1.0, float("nan"), 56_000.0):  # 56,000: grams per MWh, say
        with pytest.raises(CoordinatorRefused, match=f"grid_gco2_per_kwh is {intensity}: declare the carbon intensity "
                                                     "of the site's electricity in grams of CO2e per kWh, from 0"):
            CoordinatorClient(coordinator.address, Identity.generate()).register("x", "y", CPU, grid_gco2_per_kwh=intensity)


def test_a_worker_whose_clock_is_off_by_more_than_the_signature_window_is_told_so_at_register(coordinator) -> None:
    channel = grpc.insecure_channel(coordinator.address)
    stub = essaim_pb2_grpc.CoordinatorStub(channel)

    def register(identity: Identity, offset: float) -> pb.RegisterRequest:
        request = pb.RegisterRequest(public_key=identity.public_key, name=f"off by {offset:+.0f} s")
        return sign_request("Register", request, identity, now=lambda: time.time() + offset)

    ahead = refusal(stub.Register, register(Identity.generate(), 300))
    assert ahead.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ahead.details().startswith("Register: ") and "synchronise the worker's clock with NTP" in ahead.details()
    assert "the worker's clock is 300 s ahead of the coordinator's (limit 120 s)" in ahead.details()
    behind = refusal(stub.Register, register(Identity.generate(), -300))
    assert "the worker's clock is 300 s behind the coordinator's (limit 120 s)" in behind.details()

    close = Identity.generate()
    assert stub.Register(register(close, 100), timeout=5).worker_id == close.worker_id  # off, but inside the window
    drifted = sign_request("Heartbeat", pb.HeartbeatRequest(), close, now=lambda: time.time() + 300)
    error = refusal(stub.Heartbeat, drifted)  # a clock that drifts later is told the same on its next call
    assert error.details().startswith("Heartbeat: ") and "the worker's clock is 300 s ahead" in error.details()
    with coordinator.sessions()() as session:
        assert [w.name for w in session.scalars(select(Worker))] == ["off by +100 s"]
    channel.close()


def test_the_training_shape_is_public_so_a_worker_can_check_its_memory_before_registering(coordinator) -> None:
    shape = CoordinatorClient(coordinator.address, Identity.generate()).training_shape()  # an unregistered key
    member = CoordinatorClient(coordinator.address, Identity.generate())
    member.register("member", "Inria", CPU)
    config = member.run_config()
    assert (shape.run_id, shape.model_preset, shape.vocab_size) == (config.run_id, config.model_preset, config.vocab_size)
    assert (shape.seq_len, shape.batch_size, shape.micro_batch_size) == (config.seq_len, config.batch_size, 0)


def test_status_shows_workers_by_institution_and_class_leases_and_the_epoch(coordinator, tmp_path) -> None:
    import subprocess

    from essaim.processes import essaim_command

    hpc, volunteer = Identity.generate(), Identity.generate()
    gpu = Capabilities("cuda:0 H100", 80 << 30, "hpc", 0.0, "42", 0.0, "bf16")
    CoordinatorClient(coordinator.address, hpc).register("node-1", "GENCI", gpu, genci_certificate(hpc))
    client = CoordinatorClient(coordinator.address, volunteer)
    client.register("pc", "volunteer", CPU)
    client.heartbeat(0, 0.0, 1234.0)
    lease = client.acquire_lease(500, 0).lease

    result = subprocess.run(essaim_command("status", "--coordinator", coordinator.address, "--once"),
                            capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2/2 workers live" in out and "1,234 tokens/s" in out
    assert f"1 leases out ({lease.end - lease.start:,} tokens)" in out
    assert "GENCI" in out and "hpc" in out and "cuda:0 H100" in out and "bf16" in out and "volunteer" in out
    assert "independent" in out  # the volunteer typed no institution the run could verify
    assert "epoch 0: 0.0% of" in out and "ETA" in out

    gone = subprocess.run(essaim_command("status", "--coordinator", "127.0.0.1:1", "--once"),
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "no status from 127.0.0.1:1" in gone.stderr
