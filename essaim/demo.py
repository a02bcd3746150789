"""`essaim demo`: a whole run on 127.0.0.1 in a few minutes, with nothing left running.

Sample corpus -> token shards -> a coordinator (SQLite) and N workers as separate
process groups -> DiLoCo rounds shown live -> a Hugging Face checkpoint -> a summary
-> a federated fine-tune of that checkpoint by three sites (essaim.demo_finetune).

The institutions are real ones in miniature: each has a key the coordinator admits,
and certifies its workers' keys; the volunteers join without a certificate. One
institution also runs a validator, which replays the rounds the coordinator samples
(docs/ARCHITECTURE.md, "Checked work").
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from coordinator import reports
from coordinator.card import build_card, write_card
from coordinator.plots import write_plots
from coordinator.report_data import run_series
from coordinator.store import open_engine, session_factory, sqlite_url
from essaim.processes import free_port, start_role, stop_group, wait_for_ready_file
from governance.documents import generate_key, load_key
from model.checkpoints import latest_checkpoint, read_checkpoint
from model.corpus import prepare_corpus
from model.corpus_config import load_corpus_config
from model.sample_corpus import write_sample_corpus
from model.shards import Manifest, read_tokens
from protocol.certificates import certify
from protocol.identity import Identity

# Who each worker trains for, and the class its institution's certificate grants; None: a volunteer.
INSTITUTIONS: list[tuple[str, str] | None] = [
    ("Université Paris-Saclay", "institution"), ("GENCI Jean Zay", "hpc"), None, ("Inria", "institution"), None,
]
CERTIFICATE_SECONDS = 86400
SEQ_LEN = 128
EVAL_ROWS_PER_LANGUAGE = 8
# One shard per source: leases then come in full rounds' worth, one from each source.
SHARD_TOKENS = 1 << 20


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path
    workers: int = 3
    rounds: int = 10
    vocab_size: int = 4096
    inner_steps: int = 30
    chars_per_language: int = 1_000_000  # about a million tokens: one epoch outlasts the demo
    startup_timeout_seconds: float = 120.0
    run_timeout_seconds: float = 600.0
    finetune_rounds: int = 2  # 0: no fine-tune


def run_settings_toml(settings: DemoSettings) -> str:
    return "\n".join(
        [
            'model_preset = "tiny"',
            f"total_rounds = {settings.rounds}",
            f"target_group_size = {settings.workers}",
            f"inner_steps = {settings.inner_steps}",
            "batch_size = 8",
            f"seq_len = {SEQ_LEN}",
            # A 10-round run is short: a lighter outer momentum than DiLoCo's 0.9 (tuned for
            # long runs) overshoots less here (fixed-sample loss 8.33 -> 6.79 in a replay).
            "inner_lr = 0.002",
            "outer_lr = 0.9",
            "outer_momentum = 0.3",
            "matchmaking_seconds = 10.0",  # a straggler this late still joins its round
            "averaging_timeout_seconds = 25.0",  # a worker left out of a group waits no longer
            "heartbeat_seconds = 2",
            'compression = "8bit"',  # a quarter of fp32's bytes; error feedback resends what it drops
            "error_feedback = true",
            "checkpoint_every_rounds = 5",
            "eval_every_rounds = 2",  # held-out loss and bits per byte, per language and source (~1.5 s each)
            "",
        ]
    )


def run_demo(settings: DemoSettings) -> int:
    console = Console()
    workdir = settings.workdir.resolve()
    for stale in ("data", "logs", "keys", "checkpoint", "finetune", "run.toml", "ready.json"):
        path = workdir / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)

    with console.status("Preparing the sample corpus (French, English, code) and training a tokenizer..."):
        corpus_toml = write_sample_corpus(workdir / "corpus-text", settings.chars_per_language)
        manifest, report = prepare_corpus(
            load_corpus_config(corpus_toml), workdir / "data", vocab_size=settings.vocab_size, shard_tokens=SHARD_TOKENS
        )
    removed = sum(r["documents"] for counts in report.sources.values() for r in counts.removed.values())
    console.print(
        f"corpus {manifest.root_hash()[:16]}: {len(manifest.shards)} shards, "
        f"{sum(s.tokens for s in manifest.shards):,} tokens; {removed} documents filtered out"
    )
    console.print("tokens per word (English-only tokenizer in brackets): " + ", ".join(
        f"{language} {f['tokens_per_word']:.2f} ({f['english_only_tokens_per_word']:.2f})"
        for language, f in report.fertility.items() if "english_only_tokens_per_word" in f
    ))
    (workdir / "run.toml").write_text(run_settings_toml(settings))

    admitted, worker_args = _certify_workers(workdir / "keys", settings.workers)
    validator_args = _certify_validator(workdir / "keys", admitted)
    dashboard_port = free_port()
    coordinator = start_role(
        ["coordinator", "serve", "--data", str(workdir / "data"), "--port", "0", "--dashboard-port", str(dashboard_port),
         "--run", str(workdir / "run.toml"), "--ready-file", str(workdir / "ready.json"),
         *(f"--admit-institution={name}={key}" for name, key in admitted.items())],
        workdir / "logs" / "coordinator.log",
    )
    workers: list[subprocess.Popen[bytes]] = []
    validator: subprocess.Popen[bytes] | None = None
    try:
        ready = wait_for_ready_file(
            coordinator, workdir / "ready.json", workdir / "logs" / "coordinator.log", settings.startup_timeout_seconds
        )
        address = ready["address"]
        console.print(f"coordinator on {address}; starting {settings.workers} workers; institutions admitted by key, "
                      f"each certifying its workers: {', '.join(admitted) or 'none'} (the others join as volunteers)")
        console.print(f"watch the run in a browser: http://127.0.0.1:{dashboard_port}/")
        for index in range(settings.workers):
            args = ["worker", "join", "--coordinator", address, "--name", f"worker-{index}", *worker_args[index]]
            if index == 0:
                args += ["--checkpoint-dir", str(workdir / "checkpoint")]
            # One thread each: several workers share this machine's cores.
            workers.append(start_role(args, workdir / "logs" / f"worker-{index}.log", env={"OMP_NUM_THREADS": "1"}))
        validator = start_role(["validator", "join", "--coordinator", address, *validator_args],
                               workdir / "logs" / "validator.log", env={"OMP_NUM_THREADS": "1"})
        sessions = session_factory(open_engine(sqlite_url(workdir / "data" / "coordinator.db")))
        _show_progress(console, sessions, workers, settings)
        failed = [i for i, w in enumerate(workers) if w.returncode != 0]
    finally:
        for process in [*workers, *([validator] if validator else [])]:
            stop_group(process)
        stop_group(coordinator)
    if failed:
        console.print(f"[red]workers {failed} failed: see {workdir / 'logs'}")
        return 1
    checkpoint = _print_summary(console, sessions, manifest, workdir, settings)
    if not settings.finetune_rounds:
        return 0
    from essaim.demo_finetune import run_finetune_demo

    return run_finetune_demo(console, checkpoint, workdir / "finetune", settings.finetune_rounds)


def _certify_workers(keys: Path, workers: int) -> tuple[dict[str, str], list[list[str]]]:
    """Each institution's key (admitted by the coordinator), and each worker's identity and certificate options."""
    admitted: dict[str, str] = {}
    args = []
    for index in range(workers):
        identity = keys / f"worker-{index}.key"
        worker = Identity.load_or_create(identity)
        args.append(["--identity", str(identity)])
        certified = INSTITUTIONS[index % len(INSTITUTIONS)]
        if certified is None:
            continue
        name, trust_class = certified
        key_file = keys / f"institution-{name}.key"
        if name not in admitted:
            admitted[name] = generate_key(key_file)
        certificate = certify(name, load_key(key_file), worker.public_key, trust_class,
                              int(time.time()) + CERTIFICATE_SECONDS)
        (keys / f"worker-{index}.cert").write_bytes(certificate.to_bytes())
        args[-1] += ["--institution", name, "--certificate", str(keys / f"worker-{index}.cert")]
    return admitted, args


def _certify_validator(keys: Path, admitted: dict[str, str]) -> list[str]:
    """The validator's identity and certificate: the first admitted institution checks others' work."""
    name = next(iter(admitted))
    identity = Identity.load_or_create(keys / "validator.key")
    certificate = certify(name, load_key(keys / f"institution-{name}.key"), identity.public_key, "institution",
                          int(time.time()) + CERTIFICATE_SECONDS)
    (keys / "validator.cert").write_bytes(certificate.to_bytes())
    return ["--identity", str(keys / "validator.key"), "--certificate", str(keys / "validator.cert"),
            "--institution", name, "--name", "validator"]


def _show_progress(console: Console, sessions, workers: list[subprocess.Popen[bytes]], settings: DemoSettings) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + settings.run_timeout_seconds
    started = time.monotonic()
    with Live(console=console, refresh_per_second=2) as live:
        while any(w.poll() is None for w in workers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo run took longer than {settings.run_timeout_seconds:.0f} s")
            live.update(_progress_view(sessions, settings, time.monotonic() - started))
            time.sleep(0.5)
        live.update(_progress_view(sessions, settings, time.monotonic() - started))


def _progress_view(sessions, settings: DemoSettings, elapsed: float) -> Group:  # type: ignore[no-untyped-def]
    done = reports.rounds(sessions)
    last = done[-1] if done else None
    header = (
        f"[bold]DiLoCo round {len(done)}/{settings.rounds}[/bold]  elapsed {elapsed:5.1f} s  "
        + (f"last round: loss {last.mean_loss:.3f}, {last.max_group_size} peers averaged" if last else "warming up")
    )
    table = Table("worker", "institution", "round", "loss", "tokens/s", "tokens trained", "MB sent", "computing")
    for worker in reports.worker_progress(sessions):
        if worker.name == "validator":
            continue  # it trains nothing: it replays others' rounds
        loss = f"{worker.loss:.3f}" if worker.loss is not None else "-"
        table.add_row(worker.name, worker.institution, str(worker.round), loss,
                      f"{worker.tokens_per_second:,.0f}", f"{worker.tokens_trained:,}",
                      f"{worker.bytes_sent / 1e6:.2f}", f"{worker.compute_share:.0%}")
    return Group(header, table)


def _print_summary(console: Console, sessions, manifest: Manifest, workdir: Path, settings: DemoSettings) -> Path:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from model.evaluate import mean_loss
    from model.presets import build_model

    done = reports.rounds(sessions)
    table = Table("round", "workers", "peers averaged", "tokens", "mean loss", title="Rounds")
    for r in done:
        table.add_row(str(r.number), str(r.reports), str(r.max_group_size), f"{r.tokens:,}", f"{r.mean_loss:.3f}")
    console.print(table)
    checkpoint = latest_checkpoint(workdir / "checkpoint")
    card = build_card(sessions, read_checkpoint(checkpoint), workdir / "data")
    markdown, _ = write_card(card, checkpoint)
    if card["evaluation"]:  # eval_every_rounds: held-out figures, never trained on (change since the first)
        console.print(f"held-out bits per byte after round {card['evaluation']['round']}: " + ", ".join(
            f"{f['name']} {f['bits_per_byte']:.3f} ({f['change_bits_per_byte']:+.3f})"
            for f in card["evaluation"]["figures"] if f["group"] != "source"))
    console.print("tokens by language: " + ", ".join(f"{k} {v:,}" for k, v in card["tokens_by_language"].items()))
    console.print("tokens by source (share trained / target): " + ", ".join(
        f"{k} {v['tokens']:,} ({v['share']:.0%} / {v['target_share']:.0%})" for k, v in card["sources"].items()))
    console.print("tokens by licence: " + ", ".join(f"{k} {v:,}" for k, v in card["tokens_by_licence"].items()))
    console.print("tokens by verified institution: " + ", ".join(
        [f"{k} {v['tokens']:,}" for k, v in card["institutions"].items()]
        + [f"volunteers (no institution) {card['volunteers']['tokens']:,}"]))
    console.print("tokens by what the validator's replays found: " + ", ".join(
        f"{state} {tokens:,}" for state, tokens in card["verification"].items()))
    workers = [w for w in reports.worker_progress(sessions) if w.name != "validator"]
    console.print("tokens by worker: " + ", ".join(f"{w.name} {w.tokens_trained:,}" for w in workers))
    console.print(
        "averaging traffic (8-bit pseudo-gradients): "
        + ", ".join(f"{w.name} {w.bytes_sent / 1e6:.2f} MB" for w in workers)
        + f"; time in inner steps: {sum(w.compute_share for w in workers) / max(len(workers), 1):.0%} of wall time"
    )

    transformers_logging.disable_progress_bar()
    trained = AutoModelForCausalLM.from_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(checkpoint)  # proves the tokenizer was saved alongside
    initial = build_model("tiny", manifest.vocab_size, seed=0)
    sample = _eval_sample(manifest, workdir / "data")
    before, after = mean_loss(initial, sample, SEQ_LEN), mean_loss(trained, sample, SEQ_LEN)
    console.print(
        f"loss on a fixed corpus sample: {before:.3f} before, {after:.3f} after "
        f"{len(done)} rounds (mean training loss {done[0].mean_loss:.3f} -> {done[-1].mean_loss:.3f})"
    )
    console.print(f"checkpoint (Hugging Face format): {checkpoint}; model card: {markdown}")
    plots = write_plots(run_series(sessions, workdir / "data"), workdir / "report")
    console.print("plots (essaim report): " + ", ".join(str(plot.path) for plot in plots))
    return checkpoint


def _eval_sample(manifest: Manifest, data_dir: Path) -> torch.Tensor:
    """The first tokens of each language's first shard: a fixed, mixed sample."""
    parts, seen = [], set()
    for shard in manifest.shards:
        if shard.language in seen:
            continue
        seen.add(shard.language)
        end = min(shard.tokens, EVAL_ROWS_PER_LANGUAGE * SEQ_LEN)
        parts.append(torch.from_numpy(read_tokens(data_dir / shard.file, shard.dtype, 0, end)))
    return torch.cat(parts)
