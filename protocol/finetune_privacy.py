"""What a fine-tune's local DP costs a site, and a site's privacy floor: one accountant the server and the sites share.

The mechanism: each round a site clips its adapter update to C (L2) and adds
Gaussian noise of standard deviation s = 2C * sqrt(2 ln(1.25/delta)) / epsilon
(Flower's LocalDpMod; 2C because two datasets of one site can move a clipped
update anywhere within 2C). The noise multiplier z = s / 2C is all an
accountant needs. Every connected site answers every round (fraction_fit = 1),
so this is the subsampled Gaussian mechanism with sampling rate 1.

Basic composition adds the per-round epsilons, and the per-round formula itself
only holds for epsilon < 1. Opacus's RDP accountant gives what T rounds really
cost at one delta: far less than T x epsilon over many rounds, and, for a large
per-round epsilon, a little more than epsilon for a single round.

Opacus imports torch (about 5 s), so it is imported by the functions that
account, never by the messages of SecAgg+'s key exchange.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Sequence

SAMPLE_RATE = 1.0   # every site takes part in every round: nothing is subsampled at the site level
FLOOR_DELTA = 1e-5  # the delta a site measures its epsilon at, unless it says otherwise


def noise_multiplier(epsilon: float, delta: float) -> float:
    """Noise standard deviation over sensitivity for a (epsilon, delta) Gaussian round, as LocalDpMod calibrates it."""
    return math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def rdp_epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """The epsilon at `delta` of the rounds with these noise multipliers, composed by Opacus's RDP accountant."""
    if not noise_multipliers:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for z in noise_multipliers:
        accountant.step(noise_multiplier=z, sample_rate=SAMPLE_RATE)
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class SiteFloor:
    """The least privacy a site accepts: SecAgg+ on every round, and/or at most max_epsilon over its ledger (at delta)."""

    require_secagg: bool = False
    max_epsilon: float | None = None
    delta: float = FLOOR_DELTA

    def __post_init__(self) -> None:
        if self.max_epsilon is not None and self.max_epsilon <= 0:
            raise ValueError(f"--max-epsilon must be > 0 (got {self.max_epsilon}); leave it out for no epsilon floor")
        if not 0 < self.delta < 1:
            raise ValueError(f"the floor's delta must be in (0, 1) (got {self.delta})")

    def to_node_config(self) -> dict[str, str]:
        """As `flower-supernode --node-config` carries it: every value a string."""
        return {"require_secagg": str(self.require_secagg).lower(),
                "max_epsilon": "" if self.max_epsilon is None else repr(self.max_epsilon),
                "floor_delta": repr(self.delta)}

    @classmethod
    def from_node_config(cls, node_config: dict) -> "SiteFloor":
        """A SuperNode started without these keys (an older `essaim finetune site`) has no floor."""
        max_epsilon = str(node_config.get("max_epsilon", "")).strip()
        return cls(require_secagg=str(node_config.get("require_secagg", "false")).lower() == "true",
                   max_epsilon=float(max_epsilon) if max_epsilon else None,
                   delta=float(node_config.get("floor_delta") or FLOOR_DELTA))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SiteFloor":
        return cls(**json.loads(text))

    def describe(self) -> str:
        parts = ["requires SecAgg+"] if self.require_secagg else []
        if self.max_epsilon is not None:
            parts.append(f"at most epsilon {self.max_epsilon:g} (delta {self.delta:g}) over all its rounds")
        return ", ".join(parts) or "no floor"


@dataclass(frozen=True)
class Refusal:
    """A site declining a round because it asks for less privacy than the site's floor.

    It travels to the server as the text of the ClientApp's error (Flower keeps only
    that): a sentence for people, then the facts as JSON so the run record can list them.
    """

    site: str
    round: int
    rule: str     # "secagg", "no-dp" or "epsilon"
    reason: str   # why, and what the operator should change
    floor: SiteFloor

    def __str__(self) -> str:
        facts = {"site": self.site, "round": self.round, "rule": self.rule, "floor": asdict(self.floor)}
        return f"site {self.site} refuses round {self.round}: {self.reason} [floor-refusal {json.dumps(facts)}]"

    @classmethod
    def parse(cls, text: str) -> "Refusal | None":
        """The refusal inside an error text (Flower wraps it: "<class ...>:<'...'>"), or None if it is another failure."""
        found = re.search(r"refuses round \d+: (.*) \[floor-refusal (\{.*\})\]", text, re.DOTALL)
        if not found:
            return None
        facts = json.loads(found.group(2))
        return cls(site=facts["site"], round=facts["round"], rule=facts["rule"], reason=found.group(1),
                   floor=SiteFloor(**facts["floor"]))
