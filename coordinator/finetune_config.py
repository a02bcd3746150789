"""A federated fine-tune's settings, validated at the edge.

`essaim finetune run` builds them from its options and writes them to
OUT/finetune-settings.json; Flower's run config carries only that file's path
(`settings-file`), and the ServerApp loads and validates it again. One file
keeps the defaults in one place and records what the run was asked to do.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.finetune_privacy import noise_multiplier, rdp_epsilon


class FinetuneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path                # the community checkpoint (Hugging Face format + checkpoint.json)
    out: Path                       # adapter/, merged/, finetune.json
    rounds: int = Field(3, ge=1)
    min_sites: int = Field(2, ge=1)  # round 1 waits until this many sites are connected
    local_steps: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    max_tokens: int = Field(96, ge=8)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    round_timeout: float = Field(300.0, gt=0)  # a site silent this long is counted as dropped
    evaluate_every: int = Field(0, ge=0)  # 0: sites evaluate after the last round only (fewer messages)
    reply_poll_seconds: float = Field(0.1, ge=0)  # how often the server looks for sites' replies; 0: Flower's 3 s
    secagg: bool = True             # SecAgg+: the server sees only the sum of the sites' masked adapters
    secagg_shares: int = Field(0, ge=0)     # 0: every site holds a share of every other's key
    secagg_threshold: int = Field(0, ge=0)  # 0: min_sites - 1 (one site may drop out mid-round), at least 2
    dp_epsilon: float = Field(0.0, ge=0)    # > 0: local differential privacy, (epsilon, delta) per round
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    dp_clip: float = Field(1.0, gt=0)       # L2 bound of a site's update before noise

    @model_validator(mode="after")
    def _secagg_fits(self) -> "FinetuneSettings":
        if self.secagg and self.min_sites < 2:
            raise ValueError("secure aggregation needs min_sites >= 2 (a sum of one site's update is that update)")
        if self.secagg and self.shares < self.threshold:
            raise ValueError(f"secagg_shares {self.shares} < secagg_threshold {self.threshold}: shares cannot be rebuilt")
        return self

    @property
    def shares(self) -> int:
        return self.secagg_shares or self.min_sites

    @property
    def threshold(self) -> int:
        return self.secagg_threshold or max(2, self.min_sites - 1)

    def privacy(self) -> dict:
        """What the lineage records about privacy: the mechanisms, their settings and the resulting guarantee."""
        record: dict = {"secure_aggregation": None, "differential_privacy": None}
        if self.secagg:
            record["secure_aggregation"] = {"protocol": "SecAgg+", "num_shares": self.shares,
                                            "reconstruction_threshold": self.threshold}
        if self.dp_epsilon > 0:
            sensitivity, multiplier = 2 * self.dp_clip, noise_multiplier(self.dp_epsilon, self.dp_delta)
            record["differential_privacy"] = {
                "kind": "local (each site clips its update and adds Gaussian noise before sending)",
                "clipping_norm": self.dp_clip, "sensitivity": sensitivity,
                "noise_multiplier": multiplier, "noise_stddev": sensitivity * multiplier,
                "epsilon_per_round": self.dp_epsilon, "delta_per_round": self.dp_delta,
                # What the whole run costs a site that answers every round, at the run's delta.
                "accountant": "RDP (Opacus), Gaussian mechanism, sampling rate 1",
                "epsilon_total": rdp_epsilon([multiplier] * self.rounds, self.dp_delta), "delta_total": self.dp_delta,
                # The bound the record gave before an accountant: looser over many rounds.
                "basic_composition": {"epsilon_total": self.dp_epsilon * self.rounds,
                                      "delta_total": self.dp_delta * self.rounds},
                "unit": "a site's whole dataset (site-level)",
            }
        return record

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path) -> "FinetuneSettings":
        try:
            return cls.model_validate_json(Path(path).read_text())
        except OSError as error:
            raise ValueError(f"cannot read the fine-tune settings {path}: {error}") from None
