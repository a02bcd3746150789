"""`essaim institution`: an institution's key, and the certificates it gives its workers.

An institution's operator keeps the key; the run admits its public key (`essaim
gov init --institution NAME=KEY`, a vote, or `coordinator serve
--admit-institution NAME=KEY`). A worker prints its public key (`essaim worker
id`), the institution certifies it, and the worker joins with `--certificate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from essaim.cli_support import fail as _fail

institution_app = typer.Typer(no_args_is_help=True, help="An institution's key, and certificates for its workers.")


@institution_app.command("keygen")
def institution_keygen(out: Path = typer.Argument(..., help="Where the private key goes (PEM, readable by you only).")) -> None:
    """Make an institution's Ed25519 key pair; prints the public key the run admits it with."""
    from governance.documents import generate_key

    if out.exists():
        _fail(f"{out} exists: a key is never overwritten; choose another path")
    typer.echo(generate_key(out))


@institution_app.command("certify")
def institution_certify(
    worker_key: str = typer.Argument(..., metavar="WORKER_PUBKEY", help="The worker's public key: what "
                                     "`essaim worker id` prints on its machine (64 hex digits)."),
    key: Path = typer.Option(..., "--key", help="The institution's private key (essaim institution keygen)."),
    institution: str = typer.Option(..., "--institution", help="The institution's name, as the run admits it."),
    out: Path = typer.Option(..., "--out", help="The certificate file to write; give it to the worker."),
    trust_class: str = typer.Option("institution", "--class", help="institution, or hpc for an HPC centre's nodes."),
    days: int = typer.Option(365, min=1, help="Days until it expires."),
) -> None:
    """Certify that a worker's key trains for this institution; it joins with `worker join --certificate OUT`."""
    from governance.documents import GovernanceError, load_key
    from protocol.certificates import CertificateError, certify

    try:
        worker = bytes.fromhex(worker_key)
    except ValueError:
        _fail(f"WORKER_PUBKEY {worker_key[:70]!r} is not hex: give the 64 hex digits `essaim worker id` prints")
    try:
        certificate = certify(institution, load_key(key), worker, trust_class, int(time.time()) + days * 86400)
    except (CertificateError, GovernanceError) as error:
        _fail(str(error))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(certificate.to_bytes())
    typer.echo(f"{out}: {institution!r} certifies worker key {worker_key[:16]}… as {trust_class} until "
               f"{certificate.expires()}")


def named_keys(pairs: list[str], option: str) -> dict[str, str]:
    """{name: public key} from NAME=PUBLIC_KEY options (a name may hold '=', a key never does)."""
    named: dict[str, str] = {}
    for pair in pairs:
        name, sep, key = pair.rpartition("=")
        if not sep or not name or not key:
            _fail(f"{option} {pair!r}: expected NAME=PUBLIC_KEY (the 64 hex digits `essaim institution keygen` printed)")
        if name in named:
            _fail(f"{option}: {name!r} is named twice")
        named[name] = key
    return named
