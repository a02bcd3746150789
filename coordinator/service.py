"""The gRPC service: parse, authenticate, then hand the request to the scheduler.

Handlers receive raw bytes so that a malformed message gets a clear
INVALID_ARGUMENT instead of gRPC's generic deserialisation error. Nothing is
written to the store before a request has passed every check.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.admission import Admission, Admitted, Refused
from coordinator.config import RunSettings
from coordinator.conflicts import DatabaseBusy
from coordinator.corpus_files import CorpusFileError, CorpusFiles
from coordinator.evaluations import reported_figures
from coordinator.governed import GovernedRun
from coordinator.reachability import dial_back, peer_host
from coordinator.rounds import Member, RoundReport
from coordinator.scheduler import (
    AllocationEnding, AtLimit, Backoff, LeaseError, NotOpenYet, Quarantined, RoundOver, Scheduler,
)
from coordinator.shared_nonces import SharedNonces
from coordinator.status import StatusCache, StatusPageError
from coordinator.store import Lease, Shard, Worker
from coordinator.verification import Assignment, NotAValidator, UnknownCheck, Verdict, VerdictRefused
from protocol import essaim_pb2 as pb
from protocol.auth import AuthError, NoncesExhausted, RequestVerifier
from protocol.certificates import ADMISSION_NOTE_METADATA
from protocol.choices import ENERGY_METHODS
from protocol.credentials import CredentialError, issue_credential, read_statement
from protocol.identity import Identity

UNSIGNED = ("Register", "GetStatus", "GetTrainingShape")  # Register proves its key itself; the others are public

log = logging.getLogger("essaim.coordinator")

SERVICE_NAME = "essaim.v1.Coordinator"
REPORT_POLL_MS = 250  # how soon a worker whose round is undecided sends its report again
CHECK_POLL_MS = 1000  # how soon a validator that found no check open asks again
MAX_PEER_ID_CHARS = 128  # a hivemind peer id is ~50 base58 characters (Worker.peer_id holds 128)
WITNESSES_PER_MEMBER = 4  # a report carries at most this many witnesses per member of a full group
MAX_REASON_CHARS = 2000  # a verdict's reason, as the audit shows it
MAX_GRID_GCO2_PER_KWH = 2000.0  # the dirtiest grids (lignite) emit about 1,200: more is a unit mistake (per MWh?)
OUTCOMES = {pb.VerdictRequest.PASSED: "passed", pb.VerdictRequest.FAILED: "failed",
            pb.VerdictRequest.INCONCLUSIVE: "inconclusive"}


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
        credentials: Identity | None = None,
        *,
        admission: Admission,  # every Register check (coordinator/admission.py)
        shared_nonces: SharedNonces | None = None,  # several processes share the database: nonces claimed there too
    ) -> None:
        self._sessions = sessions
        self._admission = admission
        self._scheduler = scheduler
        self._verifier = verifier
        self._run = run
        self._run_config = run_config
        self._governed = governed
        self._corpus_files = corpus_files
        self._live_workers = 0  # counted at most once a second
        self._live_workers_at = -1.0
        self._round, self._round_at, self._kept_digest = 0, -1.0, ""
        self._quarantined: frozenset[str] = frozenset()  # worker ids, read with the round
        # Every registered worker's key, read once at start: an unknown id is refused before any database
        # read, and an id is its key's hash, so an entry never changes.
        with sessions() as session:
            self._public_keys: dict[str, bytes] = dict(session.execute(select(Worker.id, Worker.public_key)).all())
        self._shared_nonces = shared_nonces
        self._credentials = credentials or Identity.generate()  # signs round credentials (protocol/credentials.py)
        self._status = StatusCache(sessions, run_config.run_id, run.total_rounds,
                                   live_within_seconds=3 * run.heartbeat_seconds, page_max=run.bounds.status_page_max)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[type[Message], Callable[[Any], Message]]] = {
            "GetRunConfig": (pb.GetRunConfigRequest, self.get_run_config),
            "Heartbeat": (pb.HeartbeatRequest, self.heartbeat),
            "AcquireLease": (pb.AcquireLeaseRequest, self.acquire_lease),
            "CompleteRound": (pb.CompleteRoundRequest, self.complete_round),
            "ReleaseLease": (pb.ReleaseLeaseRequest, self.release_lease),
            "GetStatus": (pb.StatusRequest, self.get_status),
            "GetTrainingShape": (pb.TrainingShapeRequest, self.get_training_shape),
            "TakeCheck": (pb.TakeCheckRequest, self.take_check),
            "SubmitVerdict": (pb.VerdictRequest, self.submit_verdict),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._guarded(name, request_type, handle),
                request_deserializer=None,  # raw bytes: parsed in _guarded
                response_serializer=lambda reply: reply.SerializeToString(),
            )
            for name, (request_type, handle) in methods.items()
        }
        handlers["Register"] = grpc.unary_unary_rpc_method_handler(  # the peer's address: admission rate-limits it
            self._guarded("Register", pb.RegisterRequest, self.register, with_context=True),
            request_deserializer=None, response_serializer=lambda reply: reply.SerializeToString(),
        )
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
            except NoncesExhausted as error:  # a bound, not a forgery: the client slows down and retries
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
            except AuthError as error:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
            except LeaseError as error:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{method}: {error}")
            except DatabaseBusy as error:  # changed nothing: the worker's client sends it again
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: {error}")

        return call

    def _authenticate(self, method: str, request: Any) -> None:
        worker_id = request.auth.worker_id
        public_key = self._public_key(worker_id)
        if public_key is None:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method}: unknown worker id {worker_id[:64]!r}; register first (`essaim worker join`)",
            )
        self._verifier.verify(method, request, public_key)
        if self._shared_nonces is not None and method != "Heartbeat":  # a heartbeat's is claimed as it is written
            self._shared_nonces.claim(method, worker_id, request.auth.nonce, self._forget_nonce_at(request))

    def _forget_nonce_at(self, request: Any) -> float:
        """When a request's nonce may be forgotten: once its timestamp is no longer acceptable."""
        return request.auth.timestamp_ms / 1000 + self._verifier.max_skew_seconds

    def _public_key(self, worker_id: str) -> bytes | None:
        """The worker's registered key. Where processes share the database, one that another process registered
        is read from it (once: an id is its key's hash, so an entry never changes)."""
        public_key = self._public_keys.get(worker_id)
        if public_key is None and self._shared_nonces is not None:
            with self._sessions() as session:
                public_key = session.scalar(select(Worker.public_key).where(Worker.id == worker_id))
            if public_key is not None:
                self._public_keys[worker_id] = public_key
        return public_key

    # -- handlers ---------------------------------------------------------------------

    def register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        _require_grid_intensity(request.grid_gco2_per_kwh)
        admitted = self._admission.admit(request, context.peer(),
                                         registered=lambda id_: self._public_key(id_) is not None)
        worker_id = admitted.worker_id
        try:
            self._save_worker(request, admitted, time.time())
        except IntegrityError:  # another process inserted the same worker meanwhile: this one updates it
            self._save_worker(request, admitted, time.time())
        self._public_keys[worker_id] = request.public_key  # known from now on (after the commit)
        if admitted.note:  # the reply has no field for it: the worker reads it from the trailing metadata
            context.set_trailing_metadata(((ADMISSION_NOTE_METADATA, admitted.note.encode()),))
        return pb.RegisterReply(worker_id=worker_id, run_id=self._run_config.run_id)

    def _save_worker(self, request: pb.RegisterRequest, admitted: Admitted, now: float) -> None:
        with self._sessions.begin() as session:
            worker = session.get(Worker, admitted.worker_id)
            if worker is None:
                worker = Worker(id=admitted.worker_id, public_key=request.public_key, registered_at=now)
                session.add(worker)
            worker.name = request.name or admitted.worker_id[:8]
            worker.institution = admitted.institution  # verified by certificate, or "independent"
            worker.device = request.device or "unknown"
            worker.precision = request.precision or "fp32"
            worker.memory_bytes, worker.bandwidth_mbit = request.memory_bytes, request.bandwidth_mbit
            worker.trust_class = admitted.trust_class
            worker.available_until, worker.slurm_job_id = request.available_until, request.slurm_job_id
            worker.grid_gco2_per_kwh = request.grid_gco2_per_kwh
            worker.last_seen = now

    def get_run_config(self, request: pb.GetRunConfigRequest) -> pb.RunConfig:
        if self._governed is None:
            return self._run_config
        self._governed.current()
        config = pb.RunConfig()
        config.CopyFrom(self._run_config)
        config.governance_ledger = self._governed.document
        return config

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        _require_finite("Heartbeat", loss=request.loss, tokens_per_second=request.tokens_per_second)
        self._scheduler.heartbeat(request.auth.worker_id, request.round, request.loss, request.tokens_per_second,
                                  request.auth.nonce, self._forget_nonce_at(request))
        live_workers, current_round = self._swarm()
        head = self._governed.current().head if self._governed is not None else ""
        return pb.HeartbeatReply(live_workers=live_workers, current_round=current_round, governance_head=head,
                                 kept_params_digest=self._kept_digest,
                                 quarantined=request.auth.worker_id in self._quarantined)

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
            self._kept_digest = self._scheduler.kept_params_digest(self._round - 1)
            self._quarantined = self._scheduler.quarantined_workers()
        return self._live_workers, self._round

    def acquire_lease(self, request: pb.AcquireLeaseRequest) -> pb.AcquireLeaseReply:
        if len(request.peer_id) > MAX_PEER_ID_CHARS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"AcquireLease: peer_id has {len(request.peer_id)} characters; a hivemind peer id has at "
                          f"most {MAX_PEER_ID_CHARS}")
        if self._scheduler.run_complete(request.round):
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.RUN_COMPLETE)
        try:
            grant = self._scheduler.acquire(request.auth.worker_id, request.max_tokens, request.round, request.peer_id)
        except Quarantined as quarantined:  # no lease, so no round credential: peers will not average with it
            log.info("AcquireLease: %s", quarantined)
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.QUARANTINED)
        except Backoff as wait:
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.BACKOFF, retry_after_ms=int(wait.retry_after * 1000))
        except AllocationEnding:
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.ALLOCATION_ENDING)
        except RoundOver:
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.ROUND_OVER)
        except NotOpenYet:
            if not self._run.overlap_averaging:
                raise  # a run that does not overlap: a worker that asks ahead is refused, as any bad request
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.NOT_OPEN)
        except AtLimit as limit:
            log.info("AcquireLease: worker %s: %s", request.auth.worker_id[:8], limit)
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.AT_LIMIT)
        if grant is None:
            return pb.AcquireLeaseReply(status=pb.AcquireLeaseReply.POOL_EMPTY)
        return pb.AcquireLeaseReply(
            status=pb.AcquireLeaseReply.GRANTED, lease=lease_message(grant.lease, grant.shard),
            round_credential=self._round_credential(request, grant.round_tokens, grant.trust_class),
        )

    def _round_credential(self, request: pb.AcquireLeaseRequest, round_tokens: int, trust_class: str) -> bytes:
        """The coordinator's word that this worker's peer averages in this round, with at most these tokens."""
        worker_id = request.auth.worker_id
        return issue_credential(self._credentials, pb.RoundCredential(
            run_id=self._run_config.run_id, worker_id=worker_id, worker_key=self._public_keys[worker_id],
            peer_id=request.peer_id, round=request.round, tokens=round_tokens, trust_class=trust_class,
            expires_at=time.time() + self._run.bounds.lease_max_seconds,
        ))

    def complete_round(self, request: pb.CompleteRoundRequest) -> pb.CompleteRoundReply:
        # One NaN in a stored number fails the round's decision for every reporter: refused at the edge.
        _require_finite("CompleteRound", loss=request.loss, inner_seconds=request.inner_seconds,
                        wall_seconds=request.wall_seconds)
        _require_energy(request.energy)
        recorded = self._scheduler.complete_round(
            request.auth.worker_id,
            RoundReport(
                round=request.round,
                leases=tuple((usage.lease_id, usage.tokens_consumed) for usage in request.leases),
                loss=request.loss, pseudo_gradient_digest=request.pseudo_gradient_digest,
                params_digest=request.params_digest, group_size=request.group_size, bytes_sent=request.bytes_sent,
                inner_seconds=request.inner_seconds, wall_seconds=request.wall_seconds,
                members=self._members(request), evidence=self._evidence(request),
                evaluation=_evaluation(request),
                energy_joules=request.energy.joules, energy_method=request.energy.method,
            ),
        )
        return pb.CompleteRoundReply(
            accepted=recorded.accepted, round_params_digest=recorded.round_params_digest,
            lineage_ids=recorded.lineage_ids, lineage_head=recorded.lineage_head, pending=recorded.pending,
            retry_after_ms=REPORT_POLL_MS if recorded.pending else 0,
        )

    def _members(self, request: pb.CompleteRoundRequest) -> tuple[Member, ...]:
        """The group's signed member statements, each checked against its worker's key: who the report vouches for."""
        if len(request.member_statements) > self._run.target_group_size:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"CompleteRound: {len(request.member_statements)} member statements, more than a group holds")
        members = []
        for blob in request.member_statements:
            try:
                statement = read_statement(blob, self._public_key)
            except CredentialError as error:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"CompleteRound: {error}") from None
            if (statement.run_id, statement.round) != (self._run_config.run_id, request.round):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"CompleteRound: a member statement of worker {statement.worker_id[:8]} is for run "
                              f"{statement.run_id!r} round {statement.round}, not this report's")
            if not math.isfinite(statement.loss):  # its signer's own word, in an honest reporter's report
                log.warning("CompleteRound: worker %s's member statement gives a loss of %s: it vouches for nothing",
                            statement.worker_id[:8], statement.loss)
                continue
            members.append(Member(statement.worker_id,
                                  tuple((usage.lease_id, usage.tokens_consumed) for usage in statement.leases),
                                  statement.loss))
        return tuple(members)

    def _evidence(self, request: pb.CompleteRoundRequest) -> bytes:
        """The report's claim and witnesses, as filed for the validators (b"": it carried neither)."""
        most = WITNESSES_PER_MEMBER * self._run.target_group_size
        if len(request.witnesses) > most:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"CompleteRound: {len(request.witnesses)} witnesses; a reducer witnesses at most {most} parts "
                          "(a few per member of a group)")
        if not request.HasField("claim") and not request.witnesses:
            return b""
        evidence = pb.CompleteRoundRequest(witnesses=request.witnesses)
        if request.HasField("claim"):
            evidence.claim.CopyFrom(request.claim)
        return evidence.SerializeToString()

    def take_check(self, request: pb.TakeCheckRequest) -> pb.CheckAssignment:
        try:
            assignment = self._scheduler.take_check(request.auth.worker_id)
        except NotAValidator as error:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"TakeCheck: {error}") from None
        if assignment is None:
            return pb.CheckAssignment(check_id=0, retry_after_ms=CHECK_POLL_MS)
        return assignment_message(assignment)

    def submit_verdict(self, request: pb.VerdictRequest) -> pb.VerdictReply:
        outcome = OUTCOMES.get(request.outcome)
        if outcome is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"SubmitVerdict: outcome {request.outcome} is not PASSED, FAILED or INCONCLUSIVE")
        if len(request.reason) > MAX_REASON_CHARS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"SubmitVerdict: the reason has {len(request.reason)} characters; say it in at most "
                          f"{MAX_REASON_CHARS}")
        verdict = Verdict(request.check_id, outcome, request.reason, request.exact, request.cosine, request.norm_ratio)
        try:
            self._scheduler.submit_verdict(request.auth.worker_id, verdict)
        except UnknownCheck as error:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"SubmitVerdict: {error}") from None
        except VerdictRefused as error:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"SubmitVerdict: {error}") from None
        return pb.VerdictReply()

    def get_status(self, request: pb.StatusRequest) -> pb.StatusReply:
        try:
            return self._status.reply(request)
        except StatusPageError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"GetStatus: {error}") from None

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


def _require_finite(method: str, **values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{method}: {name} is {value}, not a finite number: a worker whose training diverged "
                          "reloads the swarm's state instead of reporting")


def _require_grid_intensity(grams_per_kwh: float) -> None:
    if not (math.isfinite(grams_per_kwh) and 0 <= grams_per_kwh <= MAX_GRID_GCO2_PER_KWH):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"Register: grid_gco2_per_kwh is {grams_per_kwh}: declare the carbon intensity of the site's "
                      f"electricity in grams of CO2e per kWh, from 0 (not declared) to {MAX_GRID_GCO2_PER_KWH:.0f} "
                      "(`essaim worker join --grid-intensity`)")


def _require_energy(energy: pb.RoundEnergy) -> None:
    """A round's energy: finite, not negative, and said how it was obtained (none at all from an older worker)."""
    if not (math.isfinite(energy.joules) and energy.joules >= 0):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"CompleteRound: energy.joules is {energy.joules}: send what the round cost the device, a finite "
                      "number of joules >= 0")
    if energy.method not in ENERGY_METHODS and (energy.method or energy.joules):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"CompleteRound: energy.method is {energy.method!r}: say how the joules were obtained, one of "
                      f"{', '.join(ENERGY_METHODS)}")


def _evaluation(request: pb.CompleteRoundRequest) -> tuple:
    """The report's held-out figures (coordinator/evaluations.py); a malformed, non-finite or negative one is refused."""
    try:
        return reported_figures(request)
    except ValueError as error:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"CompleteRound: {error}") from None


def lease_message(lease: Lease, shard: Shard) -> pb.Lease:
    """A lease as the wire has it: granted to its worker, or shown to a validator replaying it."""
    return pb.Lease(
        lease_id=lease.id, shard_id=shard.id, shard_file=shard.file, shard_sha256=shard.sha256,
        shard_tokens=shard.tokens, dtype=shard.dtype, start=lease.start, end=lease.end,
        round=lease.round, deadline_ms=int(lease.deadline * 1000),
    )


def assignment_message(assignment: Assignment) -> pb.CheckAssignment:
    check = assignment.check
    return pb.CheckAssignment(
        check_id=check.id, worker_id=check.worker_id, round=check.round,
        leases=[lease_message(lease, shard) for lease, shard in assignment.leases],
        usage=[pb.LeaseUsage(lease_id=lease_id, tokens_consumed=tokens) for lease_id, tokens in assignment.usage],
        claim=assignment.claim, witnesses=assignment.witnesses, witness_classes=assignment.witness_classes,
        start_params_digest=assignment.start_params_digest,
    )
