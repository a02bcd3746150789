"""`essaim finetune`: the SuperLink, a site's SuperNode, and launching a federated LoRA fine-tune."""

from __future__ import annotations

from pathlib import Path

import typer

from essaim.cli_support import DEFAULT_STATE_DIR
from essaim.cli_support import fail as _fail

LEDGER_FILE = "privacy-ledger.jsonl"  # in the site's working directory: the privacy it has spent, across runs

finetune_app = typer.Typer(no_args_is_help=True, help="Fine-tune a checkpoint on private data that stays on each site (Flower).")


@finetune_app.command("serve")
def finetune_serve(
    workdir: Path = typer.Option(Path("essaim-finetune-server"), help="SuperLink state (state.db) and FLWR_HOME."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(9093, help="The one port sites and `essaim finetune run` connect to."),
    tls_cert: Path | None = typer.Option(None, help="PEM certificate: TLS for sites and runs (essaim coordinator cert)."),
    tls_key: Path | None = typer.Option(None, help="PEM private key of --tls-cert."),
    insecure: bool = typer.Option(False, help="Allow plaintext on an address other than loopback."),
) -> None:
    """Start a Flower SuperLink (offline settings) that sites join and fine-tune runs are submitted to."""
    import os

    from essaim.flower import check_plaintext, flower_env, superlink_command
    from protocol.transport import ServerTLS, TransportError

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        tls = ServerTLS.from_options(tls_cert, tls_key)
        check_plaintext(host, tls is not None, insecure, "--tls-cert and --tls-key")
    except TransportError as error:
        _fail(str(error))
    command = superlink_command(workdir, host, port, tls_cert.resolve() if tls_cert else None,
                                tls_key.resolve() if tls_key else None)
    typer.echo(f"SuperLink on {host}:{port}, state in {workdir / 'state.db'}"
               + (f", TLS certificate {tls.fingerprint()}" if tls else ""), err=True)
    os.execve(command[0], command, flower_env(workdir / "flwr-home"))


@finetune_app.command("site")
def finetune_site(
    superlink: str = typer.Option("127.0.0.1:9093", help="HOST:PORT of the SuperLink (essaim finetune serve)."),
    name: str = typer.Option(..., help="This site's name, as the tuned model's card lists it."),
    data: Path = typer.Option(..., "--data", help="Private JSONL: one {\"instruction\", \"answer\"} object per line."),
    checkpoint: Path = typer.Option(..., help="This site's copy of the base checkpoint (Hugging Face format)."),
    workdir: Path | None = typer.Option(None, help="FLWR_HOME for this site (default: ~/.essaim/finetune-NAME)."),
    runtime_port: int = typer.Option(0, help="Port of the SuperNode's local app API (0: a free one)."),
    ca_cert: Path | None = typer.Option(None, help="PEM CA (or the SuperLink's own certificate) to verify its TLS with."),
    insecure: bool = typer.Option(False, help="Plaintext to a SuperLink that is not on loopback."),
    require_secagg: bool = typer.Option(False, "--require-secagg",
                                        help="Refuse any round that is not securely aggregated (SecAgg+)."),
    max_epsilon: float | None = typer.Option(None, help="Refuse rounds without DP, and any round that would bring this "
                                             "site's epsilon (RDP, over every run in its ledger) above this."),
    floor_delta: float = typer.Option(1e-5, help="The delta at which --max-epsilon is measured."),
    stock_flower: bool = typer.Option(False, "--stock-flower",
                                      help="Flower's own SuperNode: a cold process per message and 3 s polls "
                                           "(slower; the default forks warm app processes and polls every 0.1 s)."),
) -> None:
    """Join fine-tunes as one site: a Flower SuperNode whose apps read --data here and send only adapters."""
    import os

    from essaim.flower import check_plaintext, flower_env, supernode_command
    from essaim.processes import free_port
    from model.checkpoints import CheckpointError, load_model, read_checkpoint
    from model.instructions import InstructionDataError, read_pairs
    from protocol.finetune_privacy import SiteFloor
    from protocol.transport import TransportError, split_address
    from worker.finetune_floor import PrivacyLedger

    home = (workdir or DEFAULT_STATE_DIR / f"finetune-{name}").resolve()
    ledger = PrivacyLedger(home / LEDGER_FILE)
    try:
        check_plaintext(split_address(superlink)[0], ca_cert is not None, insecure, "--ca-cert")
        floor = SiteFloor(require_secagg=require_secagg, max_epsilon=max_epsilon, delta=floor_delta)
        spent = ledger.noise_multipliers()
        pairs = read_pairs(data)
        base = read_checkpoint(checkpoint)
        load_model(base)  # a site with corrupted weights should fail here, not in round 1
    except (InstructionDataError, CheckpointError, TransportError, ValueError) as error:
        _fail(str(error))
    home.mkdir(parents=True, exist_ok=True)
    node_config = {"name": name, "data": str(data.resolve()), "checkpoint": str(checkpoint.resolve()),
                   "privacy_ledger": str(ledger.path), **floor.to_node_config()}
    command = supernode_command(superlink, runtime_port or free_port(), node_config,
                                ca_cert.resolve() if ca_cert else None, stock=stock_flower)
    typer.echo(f"site {name}: {len(pairs)} pairs in {data}, base {base.params_digest[:16]}…; joining {superlink}", err=True)
    typer.echo(f"site {name}: privacy floor: {floor.describe()}; "
               + (f"spent so far epsilon {ledger.epsilon(floor.delta):.3g} (RDP, delta {floor.delta:g}) over "
                  f"{len(spent)} DP round(s), ledger {ledger.path}" if spent else f"no DP round spent yet ({ledger.path})"),
               err=True)
    os.execve(command[0], command, flower_env(home))


@finetune_app.command("run")
def finetune_run(
    checkpoint: Path = typer.Option(..., help="The base checkpoint, as the SuperLink's machine sees it."),
    out: Path = typer.Option(..., "--out", help="Where adapter/, merged/ and finetune.json go."),
    rounds: int = typer.Option(3, min=1),
    superlink: str = typer.Option("127.0.0.1:9093", help="HOST:PORT of the SuperLink."),
    min_sites: int = typer.Option(2, min=1, help="Start once this many sites are connected."),
    local_steps: int = typer.Option(20, min=1),
    learning_rate: float = typer.Option(2e-3),
    secagg: bool = typer.Option(True, help="SecAgg+: the server only ever sees the sum of the sites' adapters."),
    dp_epsilon: float = typer.Option(0.0, help="> 0: local differential privacy, this epsilon per round."),
    dp_delta: float = typer.Option(1e-5),
    dp_clip: float = typer.Option(1.0, help="L2 bound of a site's update before the noise."),
    round_timeout: float = typer.Option(300.0, help="Seconds before a silent site counts as dropped."),
    log: Path | None = typer.Option(None, help="Write Flower's run log here instead of the terminal."),
    ca_cert: Path | None = typer.Option(None, help="PEM CA (or the SuperLink's own certificate) to verify its TLS with."),
    insecure: bool = typer.Option(False, help="Plaintext to a SuperLink that is not on loopback."),
) -> None:
    """Launch a federated LoRA fine-tune on the connected sites; write the adapter, a merged model and the record."""
    from pydantic import ValidationError

    from coordinator.finetune_config import FinetuneSettings
    from coordinator.finetune_lineage import RECORD_FILE, SETTINGS_FILE, read_record
    from essaim.flower import check_plaintext, run_app
    from model.checkpoints import CheckpointError, read_checkpoint
    from protocol.transport import TransportError, split_address

    out = out.resolve()
    if (out / RECORD_FILE).exists():
        _fail(f"{out} already holds a fine-tune ({RECORD_FILE}); choose another --out")
    try:
        check_plaintext(split_address(superlink)[0], ca_cert is not None, insecure, "--ca-cert")
        read_checkpoint(checkpoint)
        settings = FinetuneSettings(
            checkpoint=checkpoint.resolve(), out=out, rounds=rounds, min_sites=min_sites, local_steps=local_steps,
            learning_rate=learning_rate, secagg=secagg, dp_epsilon=dp_epsilon, dp_delta=dp_delta, dp_clip=dp_clip,
            round_timeout=round_timeout,
        )
    except (CheckpointError, ValidationError, TransportError) as error:
        _fail(str(error))
    settings.save(out / SETTINGS_FILE)
    dp = settings.privacy()["differential_privacy"]
    if dp:
        typer.echo(f"local DP: epsilon {dp_epsilon:g} per round; over {rounds} round(s) a site that answers every one "
                   f"spends epsilon {dp['epsilon_total']:.3g} by the RDP accountant (delta {dp_delta:g}), "
                   f"{dp['basic_composition']['epsilon_total']:.3g} by basic composition", err=True)
    code = run_app(superlink, out / ".flwr-home", out / SETTINGS_FILE, log, ca_cert=ca_cert)
    if not (out / RECORD_FILE).exists():
        _fail(f"the run ended (flwr run exit {code}) without writing {out / RECORD_FILE}; see the log above"
              + (f" ({log})" if log else ""))
    record = read_record(out)
    for site, privacy in record["site_privacy"].items():
        for refusal in privacy["refused"]:  # a refusing site is left out: say so, not only in the record
            typer.echo(f"site {site} refused round {refusal['round']}: {refusal['reason']}", err=True)
    typer.echo(f"fine-tuned {rounds} round(s) with sites {', '.join(record['sites'])}: adapter {out / 'adapter'} "
               f"(sha256 {record['adapter']['sha256'][:16]}…), merged model {out / 'merged'}")
