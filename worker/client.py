"""A signed, retrying client for the coordinator's gRPC service."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import grpc
from google.protobuf.message import Message

from protocol import essaim_pb2 as pb
from protocol import essaim_pb2_grpc
from protocol.auth import sign_request
from protocol.certificates import ADMISSION_NOTE_METADATA
from protocol.identity import Identity
from protocol.limits import GRPC_OPTIONS
from protocol.transport import ClientTLS, open_channel
from worker.capabilities import Capabilities

log = logging.getLogger("essaim.worker")

# Transient: the coordinator is restarting or the network hiccupped.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED  # a bound was hit (registrations, nonces): retried, slower, then refused
SLOWEST_FETCH_BYTES_PER_SECOND = 256 * 1024  # a corpus read slower than this is given up (and retried once)


class CoordinatorUnreachable(Exception):
    pass


class CoordinatorRefused(Exception):
    """The coordinator answered with an error: its message says what is wrong."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"coordinator refused {method} ({code.name}): {details}")
        self.code = code
        self.details = details


class CoordinatorClient:
    def __init__(self, address: str, identity: Identity, retry_seconds: float = 60.0, call_timeout: float = 10.0,
                 tls: ClientTLS = ClientTLS()):
        self.address = address
        self.identity = identity
        self.retry_seconds = retry_seconds
        self.call_timeout = call_timeout
        self._channel = open_channel(address, tls, GRPC_OPTIONS)  # TransportError: no TLS off loopback, wrong pin
        self._stub = essaim_pb2_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def register(self, name: str, institution: str, capabilities: Capabilities,
                 certificate: bytes = b"", grid_gco2_per_kwh: float = 0.0) -> pb.RegisterReply:
        """Register with an institution's certificate of this key (protocol/certificates.py), if any.

        What the coordinator did not credit (a typed institution, a certificate it does
        not accept) it says in the trailing metadata; the worker logs it as a warning.
        """
        reply, call = self._call(
            "Register",
            lambda: pb.RegisterRequest(
                public_key=self.identity.public_key, name=name, institution=institution, device=capabilities.device,
                memory_bytes=capabilities.memory_bytes, bandwidth_mbit=capabilities.bandwidth_mbit,
                trust_class=capabilities.trust_class, available_until=capabilities.available_until,
                slurm_job_id=capabilities.slurm_job_id, precision=capabilities.precision,
                institution_certificate=certificate, grid_gco2_per_kwh=grid_gco2_per_kwh,
            ),
            rpc=self._stub.Register.with_call,
        )
        note = dict(call.trailing_metadata() or ()).get(ADMISSION_NOTE_METADATA)
        if note:
            log.warning("%s", note.decode(errors="replace"))
        return reply

    def training_shape(self) -> pb.TrainingShape:
        """What the run needs in memory: public, so it can be checked before registering."""
        return self._call("GetTrainingShape", pb.TrainingShapeRequest, signed=False)

    def run_config(self) -> pb.RunConfig:
        return self._call("GetRunConfig", pb.GetRunConfigRequest)

    def status(self) -> pb.StatusReply:
        """The run's public status (a one-worker page): its round, read without counting as a live worker."""
        return self._call("GetStatus", lambda: pb.StatusRequest(worker_limit=1), signed=False)

    def heartbeat(self, round_number: int, loss: float, tokens_per_second: float) -> pb.HeartbeatReply:
        return self._call(
            "Heartbeat",
            lambda: pb.HeartbeatRequest(round=round_number, loss=loss, tokens_per_second=tokens_per_second),
        )

    def acquire_lease(self, max_tokens: int, round_number: int, peer_id: str = "") -> pb.AcquireLeaseReply:
        return self._call("AcquireLease", lambda: pb.AcquireLeaseRequest(max_tokens=max_tokens, round=round_number,
                                                                         peer_id=peer_id))

    def complete_round(self, request: pb.CompleteRoundRequest, stop: Callable[[], bool] = lambda: False
                       ) -> pb.CompleteRoundReply:
        """Report a round; while the round is undecided, send the same report again as the coordinator asks.

        Returns the pending reply itself only if `stop()` turns true first (the report stays filed:
        the coordinator decides it without us).
        """
        while True:
            reply = self._call("CompleteRound", lambda: _copy(request))
            if not reply.pending or stop():
                return reply
            time.sleep(max(reply.retry_after_ms, 50) / 1000)

    def release_lease(self, lease_id: int, reason: str) -> pb.ReleaseLeaseReply:
        return self._call("ReleaseLease", lambda: pb.ReleaseLeaseRequest(lease_id=lease_id, reason=reason))

    def read_corpus_file(self, file: str, offset: int, length: int) -> Iterator[pb.CorpusBytes]:
        """A byte range of a corpus file, streamed; not retried here (the shard cache resumes and retries)."""
        request = sign_request("ReadCorpusFile", pb.ReadCorpusFileRequest(file=file, offset=offset, length=length),
                               self.identity)
        timeout = 60.0 + (length or 64 << 20) / SLOWEST_FETCH_BYTES_PER_SECOND
        return self._stub.ReadCorpusFile(request, timeout=timeout)

    def take_check(self) -> pb.CheckAssignment:
        """The next report to replay (validators only: an hpc or institution worker); check_id 0 when none is open."""
        return self._call("TakeCheck", pb.TakeCheckRequest)

    def submit_verdict(self, request: pb.VerdictRequest) -> pb.VerdictReply:
        """A verdict on a check this worker took; sending the same verdict again is harmless."""
        return self._call("SubmitVerdict", lambda: _copy(request))

    def check_reachable(self, port: int, token: bytes) -> pb.ReachabilityReply:
        return self._call("CheckReachable", lambda: pb.ReachabilityRequest(port=port, token=token))

    def _call(self, method: str, make_request: Callable[[], Message], signed: bool = True,
              rpc: Callable[..., Any] | None = None) -> Any:
        """Sign a fresh request per attempt (a retried request must not look like a replay).

        ``rpc``: another way to invoke the method (``with_call``, for the reply's metadata).
        """
        rpc = rpc or getattr(self._stub, method)
        give_up_at = time.monotonic() + self.retry_seconds
        delay = 0.2
        while True:
            request = sign_request(method, make_request(), self.identity) if signed else make_request()
            try:
                return rpc(request, timeout=self.call_timeout)
            except grpc.RpcError as error:
                code = error.code()
                if code not in RETRYABLE and code != BUSY:
                    raise CoordinatorRefused(method, code, error.details()) from None
                if "handshake" in (error.details() or "").lower():  # TLS: retrying will not change the certificate
                    raise CoordinatorRefused(method, code, (
                        f"{error.details()}: the coordinator's TLS certificate does not verify (expired, or not signed "
                        "by --ca-cert); check with the run's host, or pin it with --coordinator-fingerprint")) from None
                if code == BUSY and time.monotonic() + delay > give_up_at:
                    raise CoordinatorRefused(method, code, error.details()) from None
                if time.monotonic() + delay > give_up_at:
                    raise CoordinatorUnreachable(
                        f"no coordinator answers at {self.address} (tried for {self.retry_seconds:.0f} s: "
                        f"{error.details()}); check the address and that `essaim coordinator serve` is running"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _copy(message: Message) -> Message:
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate
