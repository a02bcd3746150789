"""What the fine-tuning server tells each site to do in a round: the fit config both sides read.

The server (coordinator.finetune_server) writes it into every fit and evaluate
instruction; the sites (worker.finetune_client) read it back. Keeping it here
keeps the two sides from importing each other and from disagreeing on a key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class SiteInstructions:
    base_digest: str              # params_digest of the checkpoint every site must start from
    server_round: int
    local_steps: int
    batch_size: int
    learning_rate: float
    max_tokens: int               # examples are cut to this many tokens
    lora_rank: int
    lora_alpha: int
    lora_targets: str             # comma-separated module names, e.g. "q_proj,v_proj"
    # Local differential privacy: the site clips its update to dp_clip (L2) and adds Gaussian
    # noise for (dp_epsilon, dp_delta) per round before anything leaves it. dp_epsilon 0: off.
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    dp_clip: float = 0.0
    # Whether the run's training rounds use SecAgg+. A site checks a training round by the
    # protocol its messages carry; it checks an evaluation (which carries none) by this.
    secagg: bool = False

    def to_config(self) -> dict[str, bool | bytes | float | int | str]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> "SiteInstructions":
        missing = [field.name for field in fields(cls) if field.name not in config]
        if missing:
            raise ValueError(
                f"the server's instructions lack {', '.join(missing)}: the server runs another "
                "version of essaim; update this site or the server so both match"
            )
        return cls(**{field.name: config[field.name] for field in fields(cls)})

    @property
    def dp_enabled(self) -> bool:
        return self.dp_epsilon > 0
