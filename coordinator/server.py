"""`essaim coordinator serve`: the gRPC server, its store, and a hivemind bootstrap peer.

With `--processes N` (PostgreSQL only), N processes serve the same port (SO_REUSEPORT: the
kernel spreads workers' connections over them) on one database, as one coordinator: the
first also runs the DHT peer, the web views, the restart grace and the ledger's retraining,
and starts the others; what sharing the database takes is in coordinator/scheduler.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.admission import Admission
from coordinator.config import CoordinatorSettings, RunSettings
from coordinator.corpus_files import CorpusFiles
from coordinator.governed import GovernedRun
from coordinator.round_terms import round_terms
from coordinator.scheduler import LeaseLimits, Scheduler
from coordinator.service import CoordinatorService
from coordinator.shared_nonces import SharedNonces
from coordinator.verification import Sampler
from coordinator.store import load_manifest, open_engine, session_factory
from coordinator.web_views import WebViews
from model.shards import Manifest
from model.tokenizer import tokenizer_sha256
from protocol import essaim_pb2 as pb
from protocol.auth import RequestVerifier
from protocol.credentials import CredentialCheck
from protocol.identity import Identity
from protocol.limits import SERVER_OPTIONS
from protocol.swarm import Swarm
from protocol.transport import ServerTLS, add_listening_port

log = logging.getLogger("essaim.coordinator")

CREDENTIAL_KEY_FILE = "credential-key.pem"  # in the corpus directory, beside coordinator.db, unless configured
# Several processes: each writes its heartbeats every second, so a lease expires this long after its
# deadline, by which time every process has written a heartbeat that arrived before the deadline.
EXPIRY_MARGIN_SECONDS = 3.0
OTHER_PROCESS_START_SECONDS = 120.0
# SO_REUSEPORT, off for one process (protocol/limits.py): on for several, which bind one port on purpose.
SHARED_PORT_OPTIONS = [*((name, value) for name, value in SERVER_OPTIONS if name != "grpc.so_reuseport"),
                       ("grpc.so_reuseport", 1)]


def run_id_for(settings: CoordinatorSettings, corpus_root_hash: str, genesis_hash: str = "") -> str:
    """The run is named by what defines it: the corpus, the run settings and, when governed, its genesis."""
    run = settings.run.model_dump(exclude={"data_url", "bounds", "eval_every_rounds"})
    if not run["overlap_averaging"]:
        del run["overlap_averaging"]  # added later: runs that do not overlap keep the ids they had
    defined_by = {"corpus": corpus_root_hash, "run": run}
    if genesis_hash:  # two governed runs on the same corpus and settings are still two runs (two swarms)
        defined_by["genesis"] = genesis_hash
    return hashlib.sha256(json.dumps(defined_by, sort_keys=True).encode()).hexdigest()[:16]


def dht_prefix(run_id: str) -> str:
    return f"essaim-{run_id}"


def build_run_config(
    settings: CoordinatorSettings, manifest: Manifest, peers: list[str], genesis_hash: str = ""
) -> pb.RunConfig:
    run = settings.run
    tokenizer_json = (settings.data_dir / "tokenizer" / "tokenizer.json").read_bytes()
    root_hash = manifest.root_hash()
    run_id = run_id_for(settings, root_hash, genesis_hash)
    return pb.RunConfig(
        run_id=run_id, model_preset=run.model_preset, vocab_size=manifest.vocab_size, seed=run.seed,
        seq_len=run.seq_len, batch_size=run.batch_size, inner_steps=run.inner_steps,
        inner_lr=run.inner_lr, outer_lr=run.outer_lr, outer_momentum=run.outer_momentum,
        total_rounds=run.total_rounds, target_group_size=run.target_group_size,
        matchmaking_seconds=run.matchmaking_seconds, averaging_timeout_seconds=run.averaging_timeout_seconds,
        lease_seconds=run.lease_seconds, heartbeat_seconds=run.heartbeat_seconds,
        compression=run.compression, error_feedback=run.error_feedback, round_seconds=run.round_seconds,
        checkpoint_every_rounds=run.checkpoint_every_rounds, leases_per_round=run.leases_per_round,
        micro_batch_size=run.micro_batch_size, compile=run.compile, data_url=run.data_url,
        aggregation=run.aggregation, verify_fraction=run.verify_fraction, eval_every_rounds=run.eval_every_rounds,
        fresh_inner_optimizer=run.verify_fraction > 0,  # a validator replays a round from a fresh inner AdamW
        overlap_averaging=run.overlap_averaging,
        initial_peers=peers, dht_prefix=dht_prefix(run_id),
        tokenizer_json=tokenizer_json, tokenizer_sha256=tokenizer_sha256(settings.data_dir / "tokenizer"),
        corpus_root_hash=root_hash, shard_dir=str(settings.data_dir.resolve()),
    )


@dataclass
class RunningCoordinator:
    server: grpc.Server
    swarm: Swarm | None  # None in the processes after the first
    address: str
    run_config: pb.RunConfig
    fingerprint: str  # of the TLS certificate, for workers to pin; "" in plaintext
    _stop_expiry: threading.Event
    genesis: str = ""  # a governed run's genesis hash: workers pin it (--genesis)
    views: WebViews | None = None  # /metrics and the dashboard, when their ports are set
    port: int = 0  # the gRPC port bound (--port 0: a free one), which further processes share

    @property
    def join_line(self) -> str:
        """The command a worker joins this run with: its address, its certificate's pin, its genesis."""
        return " ".join(["essaim worker join --coordinator", self.address,
                         *(["--coordinator-fingerprint", self.fingerprint] if self.fingerprint else []),
                         *(["--genesis", self.genesis] if self.genesis else [])])

    def stop(self) -> None:
        self._stop_expiry.set()
        if self.views is not None:
            self.views.stop()
        self.server.stop(grace=2).wait()
        if self.swarm is not None:
            self.swarm.close()


def start(settings: CoordinatorSettings, first: pb.RunConfig | None = None) -> RunningCoordinator:
    """Serve the run. `first`: this is one of the processes after the first, whose run config it serves."""
    manifest = Manifest.load(settings.data_dir / "manifest.json")
    sessions = session_factory(open_engine(settings.database_url))
    load_manifest(sessions, manifest)
    run = settings.run
    shared = settings.processes > 1
    governed = GovernedRun(settings.governance) if settings.governance else None  # refuses a ledger that fails
    shared_nonces = SharedNonces(sessions) if shared else None
    scheduler = Scheduler(sessions, lease_seconds=run.lease_seconds, total_rounds=run.total_rounds,
                          terms=round_terms(run, governed), limits=lease_limits(run), sampler=sampler_for(run),
                          lease_ahead=run.overlap_averaging, expiry_margin=EXPIRY_MARGIN_SECONDS if shared else 0.0,
                          shared_nonces=shared_nonces)
    if first is None:
        extended = scheduler.extend_leases_after_restart()
        if extended:
            log.info("restarted with %d leases out: each gets a grace period to be heartbeaten and reported", extended)

    tls = ServerTLS.from_options(settings.tls_cert, settings.tls_key)
    # Threads: 16 for requests, and as many again for shard downloads (CorpusFiles caps them).
    views = WebViews(settings if first is None else settings.model_copy(update={"metrics_port": 0,
                                                                                  "dashboard_port": 0}))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32),  # views: before, its interceptor counts RPCs
                         options=SHARED_PORT_OPTIONS if shared else SERVER_OPTIONS,
                         interceptors=views.interceptors)
    # Bound before the DHT starts: a busy port or a refused plaintext address fails fast.
    port = add_listening_port(server, settings.host, settings.port, tls, settings.insecure)
    genesis_hash = governed.current().state.genesis_hash if governed else ""
    # The key that signs round credentials outlives restarts: credentials out on leases stay valid.
    credentials = Identity.load_or_create(settings.credential_key or settings.data_dir / CREDENTIAL_KEY_FILE)
    run_id = run_id_for(settings, manifest.root_hash(), genesis_hash)
    swarm = None
    if first is None:
        swarm = Swarm(settings.host, port=settings.dht_port, announce=settings.announce,
                      credentials=CredentialCheck(credentials.public_key, run_id), dht_prefix=dht_prefix(run_id))
    try:
        if first is None:
            run_config = build_run_config(settings, manifest, swarm.visible_addresses(), genesis_hash)
            run_config.credential_key = credentials.public_key
        else:
            run_config = first
        verifier = RequestVerifier(max_nonces=run.bounds.max_nonces,
                                   max_nonces_per_worker=run.bounds.max_nonces_per_worker)
        admission = Admission.for_run(settings.admission, verifier, governed, scheduler.current_round)
        service = CoordinatorService(sessions, scheduler, verifier, settings.run, run_config,
                                     CorpusFiles(settings.data_dir, manifest), governed, credentials,
                                     admission=admission, shared_nonces=shared_nonces)
        server.add_generic_rpc_handlers((service.generic_handler(),))
        server.start()
        views.start(sessions, run_id, governed)  # after the gRPC port: a busy view port stops it all
    except BaseException:
        server.stop(grace=None)
        if swarm is not None:
            swarm.close()
        raise

    stop_expiry = threading.Event()
    threading.Thread(  # every process writes its heartbeats; the first alone retrains what the ledger says
        target=_expire_leases_periodically, args=(scheduler, stop_expiry, 1.0, governed if first is None else None),
        daemon=True,
    ).start()
    address = f"{settings.announce or settings.host}:{port}"
    return RunningCoordinator(server, swarm, address, run_config, tls.fingerprint() if tls else "", stop_expiry,
                              genesis=genesis_hash, views=views, port=port)


def lease_limits(run: RunSettings) -> LeaseLimits:
    """The run's bounds on what one worker holds, their defaults derived from the round's size."""
    bounds = run.bounds
    return LeaseLimits(min_tokens=run.seq_len, max_leases=bounds.max_leases_per_worker or 16 * run.leases_per_round,
                       max_tokens=bounds.max_tokens_per_worker or 2 * run.tokens_per_round,
                       max_seconds=bounds.lease_max_seconds,
                       decision_seconds=bounds.decision_seconds or 2 * run.averaging_timeout_seconds + run.lease_seconds,
                       idle_stake=run.tokens_per_round, live_seconds=3.0 * run.heartbeat_seconds)


def sampler_for(run: RunSettings) -> Sampler | None:
    """Which kept reports validators replay (coordinator/verification.py); None: checking is off."""
    return Sampler(run.verify_fraction) if run.verify_fraction > 0 else None


def _expire_leases_periodically(scheduler: Scheduler, stop: threading.Event, period: float,
                                governed: GovernedRun | None = None) -> None:
    """Every second: write the heartbeats received, return overdue leases' tokens to the pool, and those
    of workers the ledger says to train again ("retrain")."""
    while not stop.wait(period):
        expired = scheduler.expire_overdue()
        if expired:
            log.info("%d lease(s) passed their deadline; their tokens are back in the pool", expired)
        if governed is not None:
            workers = governed.current().state.retrain_at(scheduler.current_round())
            returned = scheduler.retrain(workers)
            if returned:
                log.info("the ledger has %d worker(s)' unverified tokens trained again: %d tokens back in the pool",
                         len(workers), returned)


def start_other_processes(settings: CoordinatorSettings, coordinator: RunningCoordinator) -> list:
    """The processes after the first, serving its port and run config; started and ready, or none."""
    others = settings.model_copy(update={"port": coordinator.port})
    context = multiprocessing.get_context("spawn")  # not fork: gRPC's threads do not survive a fork
    ready = context.Queue()
    processes = [context.Process(target=_serve_another, args=(others, coordinator.run_config.SerializeToString(),
                                                              ready), name=f"coordinator-{n}", daemon=True)
                 for n in range(2, settings.processes + 1)]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            failure = ready.get(timeout=OTHER_PROCESS_START_SECONDS)
            if failure:
                raise ValueError(f"a coordinator process did not start: {failure}")
    except BaseException:
        stop_other_processes(processes)
        raise
    return processes


def stop_other_processes(processes: list) -> None:
    for process in processes:
        process.terminate()  # SIGTERM: each stops its server
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


def _serve_another(settings: CoordinatorSettings, run_config: bytes, ready) -> None:  # type: ignore[no-untyped-def]
    """One of the processes after the first: serve until SIGTERM, or until the first process is gone."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(processName)s %(name)s: %(message)s")
    try:
        coordinator = start(settings, first=pb.RunConfig.FromString(run_config))
    except BaseException as error:
        ready.put(f"{type(error).__name__}: {error}")
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the whole group: the first stops us
    parent = os.getppid()
    ready.put("")
    try:
        while not stop.wait(1.0) and os.getppid() == parent:  # a first process killed outright: stop too
            pass
    finally:
        coordinator.stop()


def serve(settings: CoordinatorSettings, ready_file: Path | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop the server and the DHT peer."""
    coordinator = start(settings)
    try:
        others = start_other_processes(settings, coordinator) if settings.processes > 1 else []
    except BaseException:
        coordinator.stop()
        raise
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if ready_file is not None:
        # Written last and atomically: its presence means "accepting requests at this address".
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": coordinator.address, "run_id": coordinator.run_config.run_id,
                                   "fingerprint": coordinator.fingerprint, "genesis": coordinator.genesis,
                                   "join": coordinator.join_line}))
        tmp.replace(ready_file)
    log.info("coordinator for run %s listening on %s (DHT peer %s)", coordinator.run_config.run_id,
             coordinator.address, ", ".join(coordinator.run_config.initial_peers))
    if coordinator.fingerprint:  # what volunteers pin: --coordinator-fingerprint
        print(f"TLS certificate fingerprint: {coordinator.fingerprint}", flush=True)
    if coordinator.genesis:  # what workers pin: a governed run's worker trusts no ledger of another genesis
        print(f"genesis {coordinator.genesis}", flush=True)
    print(f"workers join with: {coordinator.join_line}", flush=True)  # publish it with the run
    if coordinator.views is not None and coordinator.views.metrics_url:
        print(f"Prometheus metrics: {coordinator.views.metrics_url}", flush=True)
    if coordinator.views is not None and coordinator.views.dashboard_url:
        print(f"dashboard: {coordinator.views.dashboard_url}", flush=True)
    if others:
        log.info("%d processes serve port %d together", settings.processes, coordinator.port)
    try:
        stop.wait()
    finally:
        stop_other_processes(others)
        coordinator.stop()
