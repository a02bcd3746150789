"""The gRPC service: parse, authenticate, then hand the request to the scheduler.

Handlers receive raw bytes so that a malformed message gets a clear
INVALID_ARGUMENT instead of gRPC's generic deserialisation error. Nothing is
written to the store before a request has passed every check.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from sqlalchemy.orm import Session, sessionmaker

from coordinator.config import RunSettings
from coordinator.corpus_files import CorpusFileError, CorpusFiles
from coordinator.governed import GovernedRun
from coordinator.reachability import dial_back, peer_host
from coordinator.scheduler import AllocationEnding, Backoff, LeaseError, RoundReport, Scheduler
from coordinator.status import network_status
from coordinator.store import Worker
from protocol import essaim_pb2 as pb
from protocol.auth import AuthError, RequestVerifier
from protocol.choices import PRECISIONS
from protocol.identity import PUBLIC_KEY_BYTES, worker_id_for

TRUST_CLASSES = ("hpc", "institution", "volunteer")
UNSIGNED = ("Register", "GetStatus", "GetTrainingShape")  # Register proves its key itself; the others are public

SERVICE_NAME = "essaim.v1.Coordinator"


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CoordinatorService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        scheduler: Scheduler,
        verifier: RequestVerifier,
        run: RunSettings,
        run_config: pb.RunConfig,
        corpus_files: CorpusFiles,
        governed: GovernedRun | None = None,
    ) -> None:
        self._sessions = sessions
        self._scheduler = scheduler
        self._verifier = verifier
        self._run = run
        self._run_config = run_config
        self._governed = governed
        self._corpus_files = corpus_files
        self._live_workers = 0  # counted at most once a second
        self._live_workers_at = -1.0
        self._round, self._round_at = 0, -1.0
        self._public_keys: dict[str, bytes] = {}  # registered workers' keys: an id is its key's hash, it never changes

    def generic_handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[type[Message], Callable[[Any], Message]]] = {
            "Register": (pb.RegisterRequest, self.register),
            "GetRunConfig": (pb.GetRunConfigRequest, self.get_run_config),
            "Heartbeat": (pb.HeartbeatRequest, self.heartbeat),
            "AcquireLease": (pb.AcquireLeaseRequest, self.acquire_lease),
            "CompleteRound": (pb.CompleteRoundRequest, self.complete_round),
            "ReleaseLease": (pb.ReleaseLeaseRequest, self.release_lease),
            "GetStatus": (pb.StatusRequest, self.get_status),
            "GetTrainingShape": (pb.TrainingShapeRequest, self.get_training_shape),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._guarded(name, request_type, handle),
                request_deserializer=None,  # raw bytes: parsed in _guarded
                response_serializer=lambda reply: reply.SerializeToString(),
            )
            for name, (request_type, handle) in methods.items()
        }
        handlers["CheckReachable"] = grpc.unary_unary_rpc_method_handler(
            self._guarded("CheckReachable", pb.ReachabilityRequest, self.check_reachable, with_context=True),
            request_deserializer=None, response_serializer=lambda reply: reply.SerializeToString(),
        )
        handlers["ReadCorpusFile"] = grpc.unary_stream_rpc_method_handler(
            self._guarded("ReadCorpusFile", pb.ReadCorpusFileRequest, self.read_corpus_file, with_context=True),
            request_deserializer=None, response_serializer=lambda reply: reply.SerializeToString(),
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def _guarded(
        self, method: str, request_type: type[Message], handle: Callable[..., Any], with_context: bool = False
    ) -> Callable[[bytes, grpc.ServicerContext], Any]:
        """Parse, authenticate, handle; every refusal becomes a status with its reason.

        ``with_context``: the handler also takes the call (for the peer's address, or to stream).
        """
        def call(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                request = request_type.FromString(raw)
            except DecodeError as error:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{method}: malformed {request_type.__name__} ({error}); "
                    "is the worker running the same Essaim version as the coordinator?",
                )
            try:
                if method not in UNSIGNED:
                    self._authenticate(method, request)
                return handle(request, context) if with_context else handle(request)
            except Refused as refused:
                context.abort(refused.code, str(refused))
            except AuthError as error:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
            except LeaseError as error:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{method}: {error}")

        return call

    def _authenticate(self, method: str, request: Any) -> None:
        worker_id = request.auth.worker_id
        public_key = self._public_keys.get(worker_id)
        if public_key is None:
            with self._sessions() as session:
                worker = session.get(Worker, worker_id) if worker_id else None
            if worker is None:
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{method}: unknown worker id {worker_id!r}; register first (`essaim worker join`)",
                )
            public_key = self._public_keys[worker_id] = worker.public_key
        self._verifier.verify(method, request, public_key)

    # -- handlers ---------------------------------------------------------------------

    def register(self, request: pb.RegisterRequest) -> pb.RegisterReply:
        if len(request.public_key) != PUBLIC_KEY_BYTES:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Register: public_key must be a raw {PUBLIC_KEY_BYTES}-byte Ed25519 key, "
                f"got {len(request.public_key)} bytes",
            )
        if request.trust_class not in ("", *TRUST_CLASSES):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Register: trust_class {request.trust_class!r} is not one of {', '.join(TRUST_CLASSES)}")
        if request.precision not in ("", *PRECISIONS):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Register: precision {request.precision!r} is not one of {', '.join(PRECISIONS)}")
        if request.bandwidth_mbit < 0 or request.available_until < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "Register: bandwidth_mbit and available_until must be 0 (unknown, open-ended) or positive")
        institution = request.institution or "independent"
        admitted = self._governed.current().state.institutions_at(self._swarm()[1]) if self._governed else None
        if admitted is not None and institution not in admitted:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"Register: institution {institution!r} is not admitted to this run (admitted: "
                          f"{', '.join(admitted) or 'none'}); its maintainers admit institutions by vote")
        worker_id = worker_id_for(request.public_key)
        if request.auth.worker_id != worker_id:
            raise AuthError(f"Register: worker_id {request.auth.worker_id!r} does not belong to this public key")
        self._verifier.verify("Register", request, request.public_key)
        now = time.time()
        with self._sessions.begin() as session:
            worker = session.get(Worker, worker_id)
            if worker is None:
                worker = Worker(id=worker_id, public_key=request.public_key, registered_at=now)
                session.add(worker)
            worker.name = request.name or worker_id[:8]
            worker.institution = institution
            worker.device = request.device or "unknown"
            worker.precision = request.precision or "fp32"
            worker.memory_bytes, worker.bandwidth_mbit = request.memory_bytes, request.bandwidth_mbit
            worker.trust_class = request.trust_class or "volunteer"
            worker.available_until, worker.slurm_job_id = request.available_until, request.slurm_job_id
            worker.last_seen = now
        return pb.RegisterReply(worker_id=worker_id, run_id=self._run_config.run_id)

    def get_run_config(self, request: pb.GetRunConfigRequest) -> pb.RunConfig:
        if self._governed is None:
            return self._run_config
        self._governed.current()
        config = pb.RunConfig()
        config.CopyFrom(self._run_config)
        config.governance_ledger = self._governed.document
        return config

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        self._scheduler.heartbeat(request.auth.worker_id, request.round, request.loss, request.tokens_per_second)
        live_workers, current_round = self._swarm()
        head = self._governed.current().head if self._governed is not None else ""
        return pb.HeartbeatReply(live_workers=live_workers, current_round=current_round, governance_head=head)

    def _swarm(self) -> tuple[int, int]:
        """Live workers and the current round: thousands of heartbeats a second share one reading.

        The round is read twice a second, so a worker learns within half a second that its round is over.
        """
        now = time.monotonic()
        if now - self._live_workers_at >= 1.0:
            self._live_workers = self._scheduler.live_workers(within_seconds=3 * self._run.heartbeat_seconds)
            self._live_workers_at = now
        if now - self._round_at >= 0.5:
            self._round, self._round_at = self._scheduler.current_round(), now
        return self._live_workers, self._round

    def acquire_lease(self, request: pb.AcquireLeaseRequest) -> pb.AcquireLeaseReply:
        if self._scheduler.run_complete(request.round):
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.RUN_COMPLETE)
        try:
            grant = self._scheduler.acquire(request.auth.worker_id, request.max_tokens, request.round)
        except Backoff as wait:
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.BACKOFF, retry_after_ms=int(wait.retry_after * 1000))
        except AllocationEnding:
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.ALLOCATION_ENDING)
        if grant is None:
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.POOL_EMPTY)
        lease, shard = grant.lease, grant.shard
        return pb.AcquireLeaseReply(
            status=pb.AcquireLeaseReply.GRANTED,
            lease=pb.Lease(
                lease_id=lease.id, shard_id=shard.id, shard_file=shard.file, shard_sha256=shard.sha256,
                shard_tokens=shard.tokens, dtype=shard.dtype, start=lease.start, end=lease.end,
                round=lease.round, deadline_ms=int(lease.deadline * 1000),
            ),
        )

    def complete_round(self, request: pb.CompleteRoundRequest) -> pb.CompleteRoundReply:
        recorded = self._scheduler.complete_round(
            request.auth.worker_id,
            RoundReport(
                round=request.round,
                leases=tuple((usage.lease_id, usage.tokens_consumed) for usage in request.leases),
                loss=request.loss, pseudo_gradient_digest=request.pseudo_gradient_digest,
                params_digest=request.params_digest, group_size=request.group_size, bytes_sent=request.bytes_sent,
                inner_seconds=request.inner_seconds, wall_seconds=request.wall_seconds,
            ),
        )
        return pb.CompleteRoundReply(
            accepted=recorded.accepted, round_params_digest=recorded.round_params_digest,
            lineage_ids=recorded.lineage_ids, lineage_head=recorded.lineage_head,
        )

    def get_status(self, request: pb.StatusRequest) -> pb.StatusReply:
        return network_status(self._sessions, self._run_config.run_id, self._run.total_rounds,
                              live_within_seconds=3 * self._run.heartbeat_seconds)

    def get_training_shape(self, request: pb.TrainingShapeRequest) -> pb.TrainingShape:
        config = self._run_config
        return pb.TrainingShape(
            run_id=config.run_id, model_preset=config.model_preset, vocab_size=config.vocab_size,
            seq_len=config.seq_len, batch_size=config.batch_size, micro_batch_size=config.micro_batch_size,
            error_feedback=config.error_feedback,
        )

    def read_corpus_file(self, request: pb.ReadCorpusFileRequest, context: grpc.ServicerContext) -> Any:
        try:
            pieces = self._corpus_files.read(request.file, request.offset, request.length)
        except CorpusFileError as error:
            codes = {"not_found": grpc.StatusCode.NOT_FOUND, "out_of_range": grpc.StatusCode.OUT_OF_RANGE,
                     "busy": grpc.StatusCode.RESOURCE_EXHAUSTED}
            context.abort(codes[error.kind], f"ReadCorpusFile: {error}")
        return (pb.CorpusBytes(data=piece) for piece in pieces)

    def check_reachable(self, request: pb.ReachabilityRequest, context: grpc.ServicerContext) -> pb.ReachabilityReply:
        try:
            host = peer_host(context.peer())
        except ValueError as error:
            return pb.ReachabilityReply(reachable=False, error=str(error))
        error = dial_back(host, request.port, request.token)
        return pb.ReachabilityReply(reachable=not error, seen_host=host, error=error)

    def release_lease(self, request: pb.ReleaseLeaseRequest) -> pb.ReleaseLeaseReply:
        self._scheduler.release(request.auth.worker_id, request.lease_id)
        return pb.ReleaseLeaseReply()
