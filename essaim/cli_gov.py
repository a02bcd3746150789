"""`essaim gov`: maintainers' keys, the genesis, signed proposals and votes, and verifying the ledger.

Proposals and votes are signed offline, on each maintainer's machine, with the
run round they are made at (`essaim status` shows it); whoever runs the
coordinator only submits the signed files, and the ledger refuses any that
breaks a rule. A proposal passes with the vote that gives it its threshold and
quorum, and is in force from that vote's signed round plus the activation delay.
"""

from __future__ import annotations

from pathlib import Path

import typer

from essaim.cli_institution import named_keys
from essaim.cli_support import fail as _fail

gov_app = typer.Typer(no_args_is_help=True, help="Govern a run: maintainers' keys, signed proposals, votes, the ledger.")


def _gov_ledger(path: Path):  # type: ignore[no-untyped-def]
    from governance.documents import GovernanceError
    from governance.ledger import Ledger

    try:
        return Ledger.load(path)
    except GovernanceError as error:
        _fail(str(error))


@gov_app.command("keygen")
def gov_keygen(out: Path = typer.Argument(..., help="Where the private key goes (PEM, readable by you only).")) -> None:
    """Make a maintainer's Ed25519 key pair; prints the public key to put in the genesis."""
    from governance.documents import generate_key

    if out.exists():
        _fail(f"{out} exists: a key is never overwritten; choose another path")
    typer.echo(generate_key(out))


@gov_app.command("init")
def gov_init(
    ledger: Path = typer.Option(..., help="The ledger file to create."),
    run: str = typer.Option(..., help="The run's name."),
    maintainer: list[str] = typer.Option(..., help="NAME=PUBLIC_KEY_HEX (repeatable)."),
    quorum: int = typer.Option(..., help="Fewest votes (yes or no) a proposal needs to pass."),
    threshold: int = typer.Option(..., help="Yes votes needed to pass (M of the N maintainers)."),
    voting_period: int = typer.Option(5, help="Rounds a proposal stays open for votes."),
    activation_delay: int = typer.Option(2, help="Rounds between the vote that passes a change and its taking effect."),
    config: list[str] = typer.Option([], help="KEY=VALUE of the starting config (inner_lr, outer_lr, inner_steps, compression, aggregation)."),
    institution: list[str] = typer.Option([], help="NAME=PUBLIC_KEY of an admitted institution (repeatable; "
                                          "essaim institution keygen): its certificates credit its workers."),
) -> None:
    """Write a run's genesis: its maintainers, its voting policy and its starting config."""
    from governance.documents import GovernanceError, digest, make_genesis
    from governance.ledger import Ledger

    if ledger.exists():
        _fail(f"{ledger} exists: a genesis is written once")
    try:
        genesis = make_genesis(
            run, dict(_pair(m) for m in maintainer),
            {"quorum": quorum, "threshold": threshold, "voting_period_rounds": voting_period,
             "activation_delay_rounds": activation_delay},
            {k: _value(v) for k, v in map(_pair, config)}, named_keys(institution, "--institution"),
        )
        book = Ledger(genesis)  # checks the genesis
    except GovernanceError as error:
        _fail(str(error))
    book.save(ledger)
    typer.echo(f"run {run}: genesis {digest(genesis)} (workers join it with --genesis {digest(genesis)})")


@gov_app.command("propose")
def gov_propose(
    ledger: Path = typer.Option(..., help="The run's ledger (for its genesis hash)."),
    key: Path = typer.Option(..., help="Your private key."),
    author: str = typer.Option(..., help="Your maintainer name."),
    change: str = typer.Option(..., help='JSON: {"config": {"inner_lr": 0.001}}; also mixture, maintainers, '
                               'institutions ({"admit": {"NAME": "PUBLIC_KEY"}, "remove": ["NAME"]}), '
                               'retrain ({"workers": ["WORKER_ID"]}: their unverified tokens are trained again).'),
    reason: str = typer.Option(...),
    round_: int = typer.Option(..., "--round", min=0, help="The run's current round (essaim status): signed; "
                               "the voting period counts from it."),
    out: Path = typer.Option(..., help="The signed proposal file to write."),
) -> None:
    """Sign a proposal on your own machine; submit the file to the coordinator's operator."""
    import json

    from governance.documents import GovernanceError, load_key, make_proposal, proposal_id, write_document
    from governance.state import check_change

    state = _gov_ledger(ledger).state
    try:
        parsed = json.loads(change)
    except ValueError as error:
        _fail(f"--change is not JSON ({error})")
    try:
        check_change(parsed)
        proposal = make_proposal(state.genesis_hash, author, parsed, reason, load_key(key), round_=round_)
    except GovernanceError as error:
        _fail(str(error))
    write_document(out, proposal)
    typer.echo(f"proposal {proposal_id(proposal)} written to {out}")


@gov_app.command("vote")
def gov_vote(
    proposal: Path = typer.Argument(..., help="The signed proposal file."),
    key: Path = typer.Option(..., help="Your private key."),
    voter: str = typer.Option(..., help="Your maintainer name."),
    choice: str = typer.Option(..., help="yes or no."),
    round_: int = typer.Option(..., "--round", min=0, help="The run's current round (essaim status): signed; "
                               "the vote that passes a proposal puts it in force from this round + the delay."),
    out: Path = typer.Option(..., help="The signed vote file to write."),
) -> None:
    """Sign a vote on a proposal on your own machine."""
    from governance.documents import GovernanceError, load_key, make_vote, read_document, write_document

    try:
        document = read_document(proposal)
        if document["kind"] != "proposal":
            raise GovernanceError(f"{proposal}: a {document['kind']}, not a proposal")
        vote = make_vote(document["run"], document, voter, choice, load_key(key), round_=round_)
    except GovernanceError as error:
        _fail(str(error))
    write_document(out, vote)
    typer.echo(f"{choice} vote on {vote['proposal'][:16]}… written to {out}")


@gov_app.command("submit")
def gov_submit(
    document: Path = typer.Argument(..., help="A signed proposal or vote file."),
    ledger: Path = typer.Option(...),
    round_: int = typer.Option(..., "--round", help="The run's current round: an item signed for a later round, "
                               "or a vote passing a change into a round already begun, is refused."),
) -> None:
    """Append a signed proposal or vote to the ledger, if every rule holds; otherwise nothing changes."""
    from governance.documents import GovernanceError, read_document

    book = _gov_ledger(ledger)
    try:
        item = read_document(document)
        if item["kind"] not in ("proposal", "vote"):
            raise GovernanceError(f"{document}: a {item['kind']}; only proposals and votes are submitted")
        accepted_before = len(book.state.accepted)
        entry = book.append(item, round_)
    except GovernanceError as error:
        _fail(f"refused, the ledger is unchanged: {error}")
    passed = len(book.state.accepted) > accepted_before
    book.save(ledger)
    typer.echo(f"entry {entry['seq']}: {item['kind']} signed at round {entry['round']} appended")
    if passed:
        accepted = book.state.accepted[-1]
        typer.echo(f"proposal {accepted.proposal[:16]}… passed: in force from round {accepted.activation_round}")


@gov_app.command("log")
def gov_log(ledger: Path = typer.Option(...)) -> None:
    """The ledger, entry by entry, what became of each proposal, and the config in force after it."""
    book = _gov_ledger(ledger)
    state = book.state
    typer.echo(f"genesis {state.genesis_hash} (run {book.genesis['run']})")
    for entry in book.entries:
        item = entry["item"]
        what = (f"{item['author']} proposes {item['change']}: {item['reason']}" if item["kind"] == "proposal"
                else f"{item['voter']} votes {item['choice']} on {item['proposal'][:16]}…")
        typer.echo(f"{entry['seq']:>4}  round {entry['round']:>4}  {what}")
    activation = {accepted.proposal: accepted.activation_round for accepted in state.accepted}
    for proposal in state.proposals.values():
        outcome = (f"passed at round {proposal.passed_round}, in force from round {activation[proposal.id]}"
                   if proposal.id in activation else f"not passed (a vote counts if signed by round {state.closes_at(proposal)})")
        typer.echo(f"proposal {proposal.id[:16]}…: {outcome} (yes {sorted(proposal.yes)}, no {sorted(proposal.no)})")
    last = max([book.last_round, *activation.values()])
    typer.echo(f"head {book.head}; config from round {last}: {state.config_at(last)}")


@gov_app.command("verify")
def gov_verify(ledger: Path = typer.Option(...), head: str = typer.Option("", help="A head hash you trust.")) -> None:
    """Verify the whole chain from genesis; exit 1 naming the first entry and rule that fail."""
    import json

    from governance.documents import GovernanceError
    from governance.ledger import verify

    try:
        document = json.loads(ledger.read_text(encoding="utf-8"))
        verify(document["genesis"], document["entries"], head=head or None)
    except (GovernanceError, ValueError, KeyError, TypeError, OSError) as error:
        typer.secho(f"not verified: {error}", fg=typer.colors.RED)
        raise typer.Exit(code=1)
    typer.echo(f"verified: {len(document['entries'])} entries from genesis")


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        _fail(f"{text!r}: expected NAME=VALUE")
    return name, value


def _value(text: str) -> object:
    """A config value from the command line: a number when it reads as one, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
