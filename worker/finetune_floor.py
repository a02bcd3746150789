"""A site's privacy floor, enforced on the site: refuse a round that asks for less, and keep a ledger of what was spent.

The server decides how a run is protected; the site decides what it accepts.
Before anything is trained, a round is refused (FloorRefused, whose text the
server receives as this site's failure) when the site requires SecAgg+ and the
round's messages carry no SecAgg+ protocol, when the site has an epsilon
ceiling and the round adds no noise, or when the round's noise would bring the
site's epsilon, over every DP round in its ledger, past that ceiling. An
evaluation of a run whose settings are below the floor is refused too.

The ledger (one JSON line per DP round the site answered, in its working
directory) outlives runs and SuperNode restarts: a site's data is the same from
one run to the next, so its epsilon composes across them. Rounds without DP are
not in it: they have no finite epsilon, and a site with a ceiling refuses them.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from protocol.finetune import SiteInstructions
from protocol.finetune_privacy import Refusal, SiteFloor, noise_multiplier, rdp_epsilon


class FloorRefused(RuntimeError):
    """This site will not take part in the round; str() is the Refusal the server parses."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


class PrivacyLedger:
    """Append-only JSON lines: {run_id, round, noise_multiplier, at}. One line is one write, so appends never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def noise_multipliers(self) -> list[float]:
        if not self.path.exists():
            return []
        spent = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                spent.append(float(json.loads(line)["noise_multiplier"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"{self.path}:{number} is not a ledger entry; repair that line (deleting the ledger forgets "
                    "the privacy this site has already spent, and its --max-epsilon floor with it)"
                ) from None
        return spent

    def record(self, run_id: int, server_round: int, multiplier: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"run_id": run_id, "round": server_round, "noise_multiplier": multiplier, "at": time.time()})
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, (line + "\n").encode())
            os.fsync(descriptor)  # on disk before the noised update may leave
        finally:
            os.close(descriptor)

    def epsilon(self, delta: float) -> float:
        return rdp_epsilon(self.noise_multipliers(), delta)


def ledger_of(node_config: dict) -> PrivacyLedger:
    path = node_config.get("privacy_ledger")
    if not path:
        raise ValueError("this SuperNode's --node-config lacks privacy_ledger (where the site counts the privacy it "
                         "spends): start it with `essaim finetune site`")
    return PrivacyLedger(Path(str(path)))


def admit_round(node_config: dict, instructions: SiteInstructions, secagg: bool, run_id: int) -> None:
    """Refuse the round (FloorRefused) if it asks for less than this site's floor, else count its DP in the ledger.

    Counted before training, so a noised update never leaves uncounted; a round that
    fails after this still counts (the safe side).
    """
    floor = SiteFloor.from_node_config(node_config)
    needs_ledger = instructions.dp_enabled or floor.max_epsilon is not None
    ledger = ledger_of(node_config) if needs_ledger else None
    check_round(str(node_config.get("name", "?")), floor, instructions, secagg, ledger)
    if ledger is not None and instructions.dp_enabled:
        ledger.record(run_id, instructions.server_round, noise_multiplier(instructions.dp_epsilon, instructions.dp_delta))


def admit_evaluation(node_config: dict, instructions: SiteInstructions) -> None:
    """A site evaluates only for a run whose rounds it would train in: its held-out loss is about its data too.

    An evaluation spends no epsilon and carries no SecAgg+ of its own: the run's settings are what is checked.
    """
    floor = SiteFloor.from_node_config(node_config)
    check_round(str(node_config.get("name", "?")), floor, instructions, instructions.secagg, ledger=None)


def check_round(site: str, floor: SiteFloor, instructions: SiteInstructions, secagg: bool,
                ledger: PrivacyLedger | None) -> None:
    """Raise FloorRefused if this round asks for less than the site's floor; return if the site may take part.

    Without a ledger (an evaluation) the epsilon the round would spend is not checked: it spends none.
    """
    server_round = instructions.server_round

    def refuse(rule: str, reason: str) -> None:
        raise FloorRefused(Refusal(site=site, round=server_round, rule=rule, reason=reason, floor=floor))

    if floor.require_secagg and not secagg:
        refuse("secagg", "it requires SecAgg+ (--require-secagg) and this round is not securely aggregated, so the "
                         "server would see this site's own adapter; the operator should run `essaim finetune run` "
                         "without --no-secagg")
    if floor.max_epsilon is None:
        return
    if not instructions.dp_enabled:
        refuse("no-dp", f"its floor is at most epsilon {floor.max_epsilon:g} (--max-epsilon) and this round adds no "
                        "differential-privacy noise; the operator should run `essaim finetune run` with "
                        "--dp-epsilon E (and --dp-clip)")
    if ledger is None:
        return
    spent = ledger.noise_multipliers()
    multiplier = noise_multiplier(instructions.dp_epsilon, instructions.dp_delta)
    before, after = rdp_epsilon(spent, floor.delta), rdp_epsilon([*spent, multiplier], floor.delta)
    if after > floor.max_epsilon:
        fits = _largest_round_epsilon(spent, floor, instructions.dp_delta)
        advice = (f"a round at --dp-epsilon {fits:g} or less would still fit" if fits
                  else "its budget is spent: only raising --max-epsilon on this site would let it take part")
        refuse("epsilon", f"this round (--dp-epsilon {instructions.dp_epsilon:g}) would bring its epsilon to "
                          f"{after:.3g} (RDP accountant, delta {floor.delta:g}), over its floor --max-epsilon "
                          f"{floor.max_epsilon:g} ({before:.3g} spent in {len(spent)} earlier round(s), ledger "
                          f"{ledger.path}); the operator should ask for more noise: {advice}")


def _largest_round_epsilon(spent: list[float], floor: SiteFloor, delta: float) -> float:
    """The largest per-round --dp-epsilon that keeps the site under its ceiling for one more round (0: none does).

    Rounded down to 3 significant digits, so the figure the operator reads still fits.
    """
    low, high = 0.0, 64.0
    for _ in range(30):
        middle = (low + high) / 2
        if middle > 0 and rdp_epsilon([*spent, noise_multiplier(middle, delta)], floor.delta) <= floor.max_epsilon:
            low = middle
        else:
            high = middle
    if low < 1e-6:
        return 0.0
    scale = 10.0 ** (2 - math.floor(math.log10(low)))
    return math.floor(low * scale) / scale
