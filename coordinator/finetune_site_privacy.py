"""Each site's privacy in a run, as the server sees it: its floor, the rounds it answered or refused, the epsilon spent.

A site that answers sends its floor and its ledger's epsilon in clear beside its
(masked) adapter; a site that refuses sends a Refusal as its error. The epsilon
this run cost a site is accounted here from the rounds whose update the server
received, with the same accountant the sites use (protocol.finetune_privacy).
"""

from __future__ import annotations

from dataclasses import asdict

from coordinator.finetune_config import FinetuneSettings
from protocol.finetune_privacy import Refusal, SiteFloor, noise_multiplier, rdp_epsilon


class SitesPrivacy:
    def __init__(self, settings: FinetuneSettings) -> None:
        self.dp = settings.dp_epsilon > 0
        self.multiplier = noise_multiplier(settings.dp_epsilon, settings.dp_delta) if self.dp else 0.0
        self.delta = settings.dp_delta
        self.sites: dict[str, dict] = {}

    def _site(self, name: str) -> dict:
        return self.sites.setdefault(name, {"floor": None, "rounds": [], "refused": [], "epsilon_all_runs": None})

    def answered(self, server_round: int, metrics: dict) -> None:
        site = self._site(str(metrics.get("site", "?")))
        site["rounds"].append(server_round)
        if "floor" in metrics:  # absent from a site running an older essaim
            site["floor"] = asdict(SiteFloor.from_json(str(metrics["floor"])))
        if self.dp and "epsilon_all_runs" in metrics:
            site["epsilon_all_runs"] = float(metrics["epsilon_all_runs"])

    def refused(self, refusal: Refusal) -> None:
        site = self._site(refusal.site)
        site["floor"] = asdict(refusal.floor)
        site["refused"].append({"round": refusal.round, "rule": refusal.rule, "reason": refusal.reason})

    def record(self) -> dict:
        """Per site: floor, rounds answered and refused, epsilon this run (RDP at the run's delta; None without DP)."""
        return {
            name: {**site, "epsilon_this_run": rdp_epsilon([self.multiplier] * len(site["rounds"]), self.delta)
                   if self.dp else None, "delta": self.delta if self.dp else None}
            for name, site in sorted(self.sites.items())
        }


def split_refusals(reasons: list[str]) -> tuple[list[Refusal], list[str]]:
    """(the sites' floor refusals, every other failure) among a round's failure reasons."""
    refusals, others = [], []
    for reason in reasons:
        refusal = Refusal.parse(reason)
        if refusal is None:
            others.append(reason)
        elif refusal not in refusals:
            refusals.append(refusal)
    return refusals, others


def floor_text(floor: dict | None) -> str:
    return SiteFloor(**floor).describe() if floor else "unknown (an older essaim)"
