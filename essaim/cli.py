"""The `essaim` command line. Each command parses options, then calls into its role's package."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from essaim.cli_export import export_app
from essaim.cli_eval import evaluate_checkpoint
from essaim.cli_finetune import finetune_app
from essaim.cli_gov import gov_app
from essaim.cli_hpc import hpc_app
from essaim.cli_institution import institution_app, named_keys
from essaim.cli_report import audit_summary, report
from essaim.cli_support import DEFAULT_STATE_DIR
from essaim.cli_support import fail as _fail
from essaim.cli_support import run_database as _run_database
from essaim.cli_validator import validator_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Essaim: train open language models together.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare corpora.")
coordinator_app = typer.Typer(no_args_is_help=True, help="Run a coordinator.")
worker_app = typer.Typer(no_args_is_help=True, help="Contribute compute as a worker.")
audit_app = typer.Typer(no_args_is_help=True, help="Trace and verify what a model was trained on.")
app.add_typer(data_app, name="data")
app.add_typer(audit_app, name="audit")
app.add_typer(hpc_app, name="hpc")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(worker_app, name="worker")
app.add_typer(finetune_app, name="finetune")
app.add_typer(export_app, name="export")
app.add_typer(gov_app, name="gov")
app.add_typer(institution_app, name="institution")
app.add_typer(validator_app, name="validator")
app.command("report")(report)
app.command("eval")(evaluate_checkpoint)
audit_app.command("summary")(audit_summary)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


@data_app.command("prepare")
def data_prepare(
    corpus: Path = typer.Argument(..., help="Corpus TOML: [corpus], [filters], [dedup] and [[source]] tables."),
    out: Path = typer.Option(..., "--out", help="Directory for shards, manifest.json, tokenizer/ and the report."),
    vocab_size: int | None = typer.Option(None, help="BPE vocabulary size (default: the config's, else 4096)."),
    shard_tokens: int | None = typer.Option(None, help="Most tokens per shard (default: the config's, else 2^20)."),
    executor: str = typer.Option("local", help="local (processes on this machine) or slurm (job arrays)."),
    tasks: int | None = typer.Option(None, help="Tasks each stage is split into (default: this machine's cores)."),
    partition: str | None = typer.Option(None, help="Slurm: the partition the jobs run in."),
    time: str = typer.Option("24:00:00", help="Slurm: each task's time limit."),
    cpus_per_task: int = typer.Option(1, help="Slurm: CPUs per task."),
    mem_per_cpu_gb: int = typer.Option(2, help="Slurm: memory per CPU, in GB."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Slurm: print the job scripts, submit nothing."),
) -> None:
    """Filter, deduplicate and tokenize a corpus into dated token shards with a manifest and a report.

    Runs on datatrove: each stage's tasks run as local processes or as a Slurm job array (the
    output's parent directory must then be on a file system every node shares). A run that
    fails keeps its work directory: the same command resumes it.
    """
    from pydantic import ValidationError

    from model.corpus import REPORT_FILE, ExecutorSettings, PrepareFailed, prepare_corpus, print_slurm_jobs
    from model.corpus_config import load_corpus_config
    from model.prepare_report import print_report

    try:
        settings = ExecutorSettings(kind=executor, partition=partition, time=time, cpus_per_task=cpus_per_task,
                                    mem_per_cpu_gb=mem_per_cpu_gb, **({"tasks": tasks} if tasks else {}))
    except ValidationError as error:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'executor'}: {e['msg']}" for e in error.errors()))
    if dry_run and settings.kind != "slurm":
        _fail("--dry-run prints Slurm jobs: add --executor slurm --partition NAME")
    try:
        if dry_run:
            typer.echo(print_slurm_jobs(load_corpus_config(corpus), out, settings, vocab_size=vocab_size,
                                        shard_tokens=shard_tokens))
            return
        manifest, report = prepare_corpus(
            load_corpus_config(corpus), out, vocab_size=vocab_size, shard_tokens=shard_tokens, executor=settings,
            log=lambda step: typer.echo(f"... {step}", err=True),
        )
    except (ValueError, OSError, PrepareFailed) as error:
        _fail(str(error))
    print_report(report)
    total = sum(shard.tokens for shard in manifest.shards)
    typer.echo(
        f"{len(manifest.shards)} shards, {total:,} tokens, corpus {manifest.root_hash()[:16]} in {out} "
        f"(report: {out / REPORT_FILE})"
    )


@coordinator_app.command("serve")
def coordinator_serve(
    data: Path = typer.Option(..., "--data", help="A prepared corpus directory (essaim data prepare)."),
    database: str = typer.Option("", help="SQLAlchemy URL; default: SQLite file coordinator.db in --data."),
    host: str = typer.Option("127.0.0.1", help="Address gRPC and the DHT peer bind; 0.0.0.0: every interface."),
    port: int = typer.Option(50051, help="gRPC port; 0 picks a free port (see --ready-file)."),
    announce: str = typer.Option("", help="Address workers dial when it is not --host (public IP, DNS name)."),
    dht_port: int = typer.Option(0, help="TCP port of the DHT peer (0: a free one); open it to workers."),
    tls_cert: Path | None = typer.Option(None, help="PEM certificate: serve gRPC over TLS (essaim coordinator cert)."),
    tls_key: Path | None = typer.Option(None, help="PEM private key of --tls-cert."),
    insecure: bool = typer.Option(False, help="Allow plaintext gRPC on an address other than loopback."),
    run: Path | None = typer.Option(None, "--run", help="Run settings TOML (keys of RunSettings)."),
    ready_file: Path | None = typer.Option(None, help="Write {address, run_id, fingerprint, genesis, join} JSON here once serving."),
    governance: Path | None = typer.Option(None, help="The run's ledger (essaim gov init): maintainers' votes govern the run."),
    admit_institution: list[str] = typer.Option(
        [], help="NAME=PUBLIC_KEY of an institution whose certificates credit its workers (repeatable; "
                 "essaim institution keygen). A governed run admits institutions by vote instead."),
    institutions_only: bool = typer.Option(False, help="Refuse workers without an admitted institution's "
                                           "certificate (else they join as volunteers)."),
    registrations_per_minute: int = typer.Option(60, min=1, help="New worker keys one address may register a minute."),
    registration_burst: int = typer.Option(20, min=1, help="New worker keys one address may register at once."),
    metrics_port: int = typer.Option(0, min=0, max=65535, help="Serve Prometheus metrics at http://HOST:PORT/metrics "
                                     "(on --host; 0: none)."),
    dashboard_port: int = typer.Option(0, min=0, max=65535, help="Serve the run's live web page, read-only and "
                                       "public, at http://HOST:PORT/ (on --host; 0: none)."),
    processes: int = typer.Option(1, min=1, max=64, help="Processes serving the port together, on one PostgreSQL "
                                  "database (--database postgresql+psycopg://...): past one core's worth of workers."),
    verbose: bool = typer.Option(True),
) -> None:
    """Serve leases, rounds, shards and the run config over gRPC until SIGTERM/SIGINT; print the join line."""
    from pydantic import ValidationError

    from coordinator.config import AdmissionSettings, CoordinatorSettings, RunSettings, load_run_settings
    from coordinator.server import serve
    from coordinator.store import sqlite_url
    from protocol.swarm import SwarmError

    _logging(verbose)
    try:
        settings = CoordinatorSettings(
            data_dir=data,
            database_url=database or sqlite_url(data / "coordinator.db"),
            host=host, port=port, announce=announce, dht_port=dht_port,
            tls_cert=tls_cert, tls_key=tls_key, insecure=insecure,
            run=load_run_settings(run) if run else RunSettings(),
            governance=governance,
            admission=AdmissionSettings(
                institutions=named_keys(admit_institution, "--admit-institution"), institutions_only=institutions_only,
                registrations_per_minute=registrations_per_minute, registration_burst=registration_burst),
            metrics_port=metrics_port, dashboard_port=dashboard_port, processes=processes,
        )
        serve(settings, ready_file)
    except (ValueError, ValidationError, FileNotFoundError, SwarmError) as error:  # TransportError is a ValueError
        _fail(str(error))


@coordinator_app.command("cert")
def coordinator_cert(
    host: list[str] = typer.Option(..., "--host", help="Address or DNS name workers dial (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Directory for cert.pem and key.pem."),
    days: int = typer.Option(365, min=1),
) -> None:
    """Make a self-signed TLS certificate for `coordinator serve`; workers pin the fingerprint it prints."""
    from protocol.transport import ServerTLS, TransportError, write_self_signed

    try:
        cert, key = write_self_signed(out, host, days)
    except TransportError as error:
        _fail(str(error))
    typer.echo(f"{cert} and {key}; fingerprint {ServerTLS.load(cert, key).fingerprint()}")


@coordinator_app.command("rewind")
def coordinator_rewind(
    data: Path = typer.Option(..., "--data", help="The run's prepared corpus directory."),
    database: str = typer.Option("", help="SQLAlchemy URL; default: SQLite file coordinator.db in --data."),
    to_round: int = typer.Option(..., help="The checkpoint's next_round (its checkpoint.json)."),
) -> None:
    """After a crash: forget rounds from TO_ROUND on, so the run resumes from a checkpoint."""
    from coordinator.rewind import RewindRefused, rewind

    try:
        done = rewind(_run_database(data, database), to_round)
    except RewindRefused as error:
        _fail(str(error))
    typer.echo(f"rewound {done.rounds} round(s): {done.leases} lease(s), {done.tokens} tokens back in the pool")


@worker_app.command("join")
def worker_join(
    coordinator: str = typer.Option(..., help="HOST:PORT of the coordinator."),
    identity: Path = typer.Option(DEFAULT_STATE_DIR / "worker.key", help="Ed25519 key (created if missing)."),
    name: str = typer.Option("", help="Worker name shown to others (default: id prefix)."),
    institution: str = typer.Option("independent", help="The institution you claim; credited only with its --certificate."),
    certificate: Path | None = typer.Option(None, help="Your institution's certificate of this worker's key "
                                            "(essaim institution certify); without one you join as a volunteer."),
    host: str = typer.Option("127.0.0.1", help="Address the hivemind peer binds; 0.0.0.0: every interface."),
    announce: str = typer.Option("", help="Address peers dial when it is not --host (default with 0.0.0.0: as the "
                                 "coordinator sees this machine)."),
    dht_port: int = typer.Option(0, help="TCP port of the hivemind peer (0: a free one)."),
    client_mode: bool = typer.Option(False, help="Never accept connections (behind a NAT); chosen anyway when the "
                                     "coordinator cannot dial this machine back."),
    ca_cert: Path | None = typer.Option(None, help="PEM CA (or the coordinator's certificate) to verify its TLS with."),
    coordinator_fingerprint: str = typer.Option("", help="sha256:... of the coordinator's certificate (it prints it)."),
    insecure: bool = typer.Option(False, help="Plaintext to a coordinator that is not on loopback."),
    data: Path | None = typer.Option(None, "--data", help="Shards directory: a full local copy, or where fetched "
                                     "chunks are cached (default: the coordinator's if visible, else ~/.essaim/data/RUN)."),
    cache_bytes: str = typer.Option("10G", help="Most bytes of fetched shards to keep (K, M, G suffixes; 0: no cap)."),
    checkpoint_dir: Path | None = typer.Option(
        None, help="Save checkpoints here (Hugging Face format) and resume from the latest one."
    ),
    connect_seconds: float = typer.Option(15.0, help="Give up if the coordinator does not answer this long."),
    trust_class: str = typer.Option("volunteer", help="hpc, institution or volunteer: claimed; granted only by --certificate."),
    available_until: str = typer.Option(
        "", help="When this machine leaves (ISO date-time or unix seconds); default: the Slurm job's end, else never."
    ),
    bandwidth_mbit: float = typer.Option(0.0, help="Uplink estimate in Mbit/s (0: unknown)."),
    genesis: str = typer.Option("", help="The governed run's genesis hash (in the join line its coordinator prints); "
                                "a governed run is joined only with it."),
    device: str = typer.Option("auto", help="auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast where the GPU has it, else fp32), fp32 or bf16."),
    micro_batch_size: int | None = typer.Option(
        None, min=1, help="Rows per forward/backward pass, gradients accumulated (default: the run's setting)."
    ),
    adversary: str = typer.Option("", hidden=True, help="Tests and benchmarks: misbehave this way (worker/adversary.py)."),
    metrics_port: int = typer.Option(0, min=0, max=65535, help="Serve this worker's Prometheus metrics on --host at this port "
                                     "(0: none)."),
    rated_watts: float = typer.Option(0.0, min=0.0, help="The device's rated power in W (the whole CPU package on the "
                                      "CPU, the GPU's board power on CUDA): sets the energy estimate where no "
                                      "counter (NVML, RAPL) can be read; 0: a typical figure."),
    grid_intensity: float = typer.Option(0.0, min=0.0, help="gCO2e per kWh the site's electricity emits, for the "
                                         "model card's emissions estimate (0: not declared)."),
    verbose: bool = typer.Option(True),
) -> None:
    """Join a run: lease shards (fetched and verified if not here), train DiLoCo rounds with peers, report."""
    from model.checkpoints import CheckpointError
    from model.shards import ShardIntegrityError
    from protocol.choices import TRUST_CLASSES
    from protocol.swarm import SwarmError
    from protocol.transport import ClientTLS
    from worker.agent import WorkerOptions, run_worker
    from worker.client import CoordinatorRefused, CoordinatorUnreachable
    from worker.memory import DoesNotFit, OutOfDeviceMemory
    from worker.shards import ShardUnavailable

    _logging(verbose)
    if trust_class not in TRUST_CLASSES:
        _fail(f"--trust-class {trust_class!r}: use {', '.join(TRUST_CLASSES)}")
    try:
        options = WorkerOptions(
            coordinator=coordinator, identity_path=identity, name=name, institution=institution,
            host=host, announce=announce, dht_port=dht_port, client_mode=client_mode,
            tls=ClientTLS(ca_cert=ca_cert, fingerprint=coordinator_fingerprint, insecure=insecure),
            data_dir=data, cache_bytes=_byte_count(cache_bytes), checkpoint_dir=checkpoint_dir,
            connect_seconds=connect_seconds, trust_class=trust_class, certificate=certificate,
            available_until=_moment(available_until) if available_until else None,
            bandwidth_mbit=bandwidth_mbit, genesis=genesis, device=device, precision=precision,
            micro_batch_size=micro_batch_size, adversary=adversary, metrics_port=metrics_port,
            rated_watts=rated_watts, grid_gco2_per_kwh=grid_intensity,
        )
        raise typer.Exit(code=run_worker(options))
    except (CoordinatorUnreachable, CoordinatorRefused, ShardIntegrityError, ShardUnavailable, CheckpointError,
            ValueError, DoesNotFit, OutOfDeviceMemory, SwarmError) as error:  # DeviceError, TransportError: ValueError
        _fail(str(error))


@worker_app.command("id")
def worker_id(
    identity: Path = typer.Option(DEFAULT_STATE_DIR / "worker.key", help="Ed25519 key (created if missing)."),
) -> None:
    """Print this worker's public key: what an institution certifies (essaim institution certify KEY ...)."""
    from protocol.identity import Identity

    try:
        worker = Identity.load_or_create(identity)
    except (ValueError, OSError) as error:
        _fail(str(error))
    typer.echo(worker.public_key.hex())
    typer.echo(f"worker id {worker.worker_id} (key file {identity})", err=True)


def _byte_count(text: str) -> int:
    """"10G" -> 10 * 2**30; plain digits are bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().rstrip("B").rstrip("I"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        return int(float(number) * units[unit])
    except ValueError:
        _fail(f"{text!r} is not a byte count such as 10G, 512M or 0")


def _moment(text: str) -> float:
    """Unix seconds from "1767225600" or an ISO date-time ("2026-11-23T18:00:00", local time unless zoned)."""
    import datetime as dt

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        _fail(f"{text!r} is neither unix seconds nor an ISO date-time such as 2026-11-23T18:00:00")


@audit_app.command("card")
def audit_card(
    checkpoint: Path = typer.Argument(..., help="A checkpoint directory (round-NNNNNN, or the DIR holding 'latest')."),
    data: Path = typer.Option(..., "--data", help="The run's prepared corpus directory."),
    database: str = typer.Option("", help="SQLAlchemy URL; default: SQLite file coordinator.db in --data."),
    out: Path | None = typer.Option(None, "--out", help="Where MODEL_CARD.md and model_card.json go (default: CHECKPOINT)."),
    governance: Path | None = typer.Option(
        None, "--governance", help="The run's ledger: the card then says what each config version changed."),
) -> None:
    """Write a model/data card for a checkpoint from the lineage records: data, contributors, configs."""
    from coordinator.card import CardError, build_card, write_card
    from governance.ledger import Ledger
    from model.checkpoints import CheckpointError, latest_checkpoint, read_checkpoint

    try:
        path = latest_checkpoint(checkpoint) or checkpoint
        ledger = Ledger.load(governance) if governance else None
        card = build_card(_run_database(data, database), read_checkpoint(path), data, ledger)
    except (CardError, CheckpointError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    markdown, document = write_card(card, out or path)
    typer.echo(f"{card['tokens']:,} tokens traced to {len(card['sources'])} sources and {len(card['workers'])} workers: "
               f"{markdown}, {document}")


@audit_app.command("verify")
def audit_verify(
    data: Path = typer.Option(..., "--data", help="The run's prepared corpus directory."),
    database: str = typer.Option("", help="SQLAlchemy URL; default: SQLite file coordinator.db in --data."),
    checkpoint: list[Path] = typer.Option([], "--checkpoint", help="Checkpoint directories to check too (repeatable)."),
) -> None:
    """Recompute shard hashes and check lineage, token accounting and checkpoints; exit 1 on any problem."""
    from transformers.utils import logging as transformers_logging

    from coordinator.audit import verify_run

    transformers_logging.disable_progress_bar()
    try:
        result = verify_run(_run_database(data, database), data, checkpoint)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    for problem in result.problems:
        typer.secho(f"problem: {problem}", fg=typer.colors.RED)
    for finding in result.findings:
        typer.secho(f"finding: {finding}", fg=typer.colors.YELLOW)
    credit = ", ".join(f"{tokens} {state}" for state, tokens in result.credit.items())
    summary = (f"{result.shards} shards, {result.lineage_records} lineage records ({credit or 'no'} tokens, "
               f"{result.energy_kwh:.3g} kWh), {result.checkpoints} checkpoints checked")
    if result.problems:
        typer.echo(f"{len(result.problems)} problem(s) in {summary}")
        raise typer.Exit(code=1)
    typer.echo(f"verified: {summary}; no problem found")


@app.command()
def status(
    coordinator: str = typer.Option(..., help="HOST:PORT of the coordinator."),
    interval: float = typer.Option(2.0, min=0.2, help="Seconds between refreshes."),
    once: bool = typer.Option(False, help="Print the view once and exit."),
    ca_cert: Path | None = typer.Option(None, help="PEM CA (or the coordinator's certificate) to verify its TLS with."),
    coordinator_fingerprint: str = typer.Option("", help="sha256:... of the coordinator's certificate."),
    insecure: bool = typer.Option(False, help="Plaintext to a coordinator that is not on loopback."),
    workers_page: int = typer.Option(0, min=0, help="Workers to list (0: the coordinator's default page)."),
    workers_offset: int = typer.Option(0, min=0, help="Skip this many workers (by name): the next page."),
) -> None:
    """A live view of the network: workers by institution and class, leases, rounds, tokens/s, the epoch's ETA."""
    from essaim.status_view import StatusUnavailable, watch
    from protocol.transport import ClientTLS, TransportError

    try:
        watch(coordinator, interval, once, ClientTLS(ca_cert=ca_cert, fingerprint=coordinator_fingerprint,
                                                     insecure=insecure), offset=workers_offset, limit=workers_page)
    except (StatusUnavailable, TransportError) as error:
        _fail(str(error))
    except KeyboardInterrupt:
        pass


@app.command()
def demo(
    workdir: Path = typer.Option(Path("essaim-demo"), help="Where the corpus, database, logs and checkpoint go."),
    workers: int = typer.Option(3, min=1, max=8),
    rounds: int = typer.Option(10, min=1),
    finetune_rounds: int = typer.Option(2, min=0, help="Rounds of the federated fine-tune that follows (0: none)."),
) -> None:
    """Train the tiny model with a coordinator and workers on 127.0.0.1, then fine-tune it federated on 3 sites."""
    from essaim.demo import DemoSettings, run_demo

    raise typer.Exit(code=run_demo(DemoSettings(workdir=workdir, workers=workers, rounds=rounds,
                                                finetune_rounds=finetune_rounds)))
