"""`essaim validator join`: replay sampled rounds of other workers (worker/validate.py).

A validator is certified like an institution's worker (`essaim worker id`, then the
institution's `essaim institution certify`): the coordinator gives checks to certified
workers only, since a verdict can quarantine a stranger.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from essaim.cli_support import DEFAULT_STATE_DIR
from essaim.cli_support import fail as _fail

validator_app = typer.Typer(no_args_is_help=True, help="Check others' work by replaying it.")


@validator_app.command("join")
def validator_join(
    coordinator: str = typer.Option(..., help="HOST:PORT of the coordinator."),
    certificate: Path = typer.Option(..., help="An admitted institution's certificate of this key "
                                     "(essaim institution certify): only certified workers validate."),
    identity: Path = typer.Option(DEFAULT_STATE_DIR / "validator.key", help="Ed25519 key (created if missing)."),
    name: str = typer.Option("", help="Name shown to others (default: validator-<id prefix>)."),
    institution: str = typer.Option(..., help="The institution that certified this key."),
    trust_class: str = typer.Option("institution", help="institution or hpc, as the certificate says."),
    host: str = typer.Option("127.0.0.1", help="Address the hivemind peer binds (it only downloads states)."),
    ca_cert: Path | None = typer.Option(None, help="PEM CA (or the coordinator's certificate) to verify its TLS with."),
    coordinator_fingerprint: str = typer.Option("", help="sha256:... of the coordinator's certificate."),
    insecure: bool = typer.Option(False, help="Plaintext to a coordinator that is not on loopback."),
    data: Path | None = typer.Option(None, "--data", help="Shards directory (default: the coordinator's if visible, "
                                     "else ~/.essaim/data/RUN)."),
    genesis: str = typer.Option("", help="The governed run's genesis hash, as for `worker join`."),
    device: str = typer.Option("cpu", help="Where to replay: cpu (exact replays of CPU workers) or cuda[:N]."),
    verbose: bool = typer.Option(True),
) -> None:
    """Replay sampled rounds of other workers and send the coordinator a verdict on each, until the run ends."""
    from protocol.transport import ClientTLS
    from worker.client import CoordinatorRefused, CoordinatorUnreachable
    from worker.shards import ShardUnavailable
    from worker.validate import ValidatorOptions, run_validator

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = ValidatorOptions(
        coordinator=coordinator, identity_path=identity, certificate=certificate, name=name, institution=institution,
        trust_class=trust_class, host=host, tls=ClientTLS(ca_cert=ca_cert, fingerprint=coordinator_fingerprint,
                                                          insecure=insecure),
        data_dir=data, genesis=genesis, device=device,
    )
    try:
        verdicts = run_validator(options)
    except (CoordinatorUnreachable, CoordinatorRefused, ShardUnavailable, ValueError) as error:
        _fail(str(error))
    typer.echo(f"validator done: {verdicts['passed']} passed, {verdicts['failed']} failed, "
               f"{verdicts['inconclusive']} inconclusive")
