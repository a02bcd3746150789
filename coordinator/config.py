"""The coordinator's settings: the run's hyperparameters and where things live.

Validated at the edge (pydantic): a bad value stops `essaim coordinator serve`
with a message naming the field, before anything starts.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from sqlalchemy.engine import make_url

from protocol.auth import DEFAULT_MAX_NONCES, DEFAULT_MAX_NONCES_PER_WORKER
from protocol.choices import AGGREGATIONS, COMPRESSIONS, INDEPENDENT, UNCHECKABLE_COMPRESSIONS


class Bounds(BaseModel):
    """What one worker may hold or cost the coordinator (docs/ARCHITECTURE.md, "Rounds and trust").

    Not part of what defines the run (left out of its id): an operator may tighten them
    on a restart. None: derived from the round's size (coordinator/server.py, lease_limits).
    """

    model_config = ConfigDict(extra="forbid")

    lease_max_seconds: float = Field(6 * 3600, ge=1)  # a lease ends this long after its grant, heartbeats or not
    # After a group's first report, how long its round waits for leases still out (coordinator/rounds.py).
    # None: twice the averaging timeout plus a lease period, so a group that averaged at the same time is in.
    decision_seconds: float | None = Field(None, gt=0)
    # Timed rounds on small shards take many small leases: the count bound is loose, the tokens one tight.
    max_leases_per_worker: int | None = Field(None, ge=1)  # default: 16 x leases_per_round
    max_tokens_per_worker: int | None = Field(None, ge=1)  # default: 2 x a round's tokens
    # What any caller may cost: GetStatus is public, and every signed request leaves a nonce to remember.
    status_page_max: int = Field(500, ge=1)  # workers listed in one GetStatus reply (its worker_limit)
    max_nonces: int = Field(DEFAULT_MAX_NONCES, ge=1)  # replay nonces remembered, all workers together
    max_nonces_per_worker: int = Field(DEFAULT_MAX_NONCES_PER_WORKER, ge=1)  # one worker's, inside the skew window


class RunSettings(BaseModel):
    """What every worker of the run trains with (sent to workers as RunConfig)."""

    model_config = ConfigDict(extra="forbid")

    model_preset: str = "tiny"
    seed: int = 0
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(8, ge=1)
    inner_steps: int = Field(20, ge=1)  # per round; with round_seconds, the most a round may take
    inner_lr: float = Field(1e-3, gt=0)
    outer_lr: float = Field(0.7, gt=0)
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    total_rounds: int = Field(4, ge=1)
    target_group_size: int = Field(3, ge=1)
    matchmaking_seconds: float = Field(3.0, gt=0)
    averaging_timeout_seconds: float = Field(60.0, gt=0)
    lease_seconds: int = Field(60, ge=5)
    heartbeat_seconds: int = Field(5, ge=1)
    compression: str = "none"  # pseudo-gradients on the wire: one of protocol.choices.COMPRESSIONS
    error_feedback: bool = False       # carry what compression lost into the next round
    round_seconds: float = Field(0.0, ge=0)  # > 0: rounds end on time, so fast and slow workers both fit
    checkpoint_every_rounds: int = Field(0, ge=0)  # > 0: workers with --checkpoint-dir save every K rounds
    # A worker trains a round on this many leases at once, a batch from each in turn, so its
    # pseudo-gradient mixes shards (sources) like its peers' do: averaging non-IID workers hurts.
    leases_per_round: int = Field(4, ge=1)
    # > 0: each batch trains in passes of this many rows, gradients accumulated, so a GPU too small
    # for batch_size rows at once trains the same tokens to the same result. 0: one pass.
    micro_batch_size: int = Field(0, ge=0)
    compile: bool = False              # workers wrap the model in torch.compile (faster on GPUs, slow to start)
    # How a reducer combines the parts of its slice: one of protocol.choices.AGGREGATIONS. A clipped
    # or trimmed mean bounds what one sender's part can move the average (worker/aggregation.py).
    aggregation: str = "clipped_mean"
    # The base share of kept reports a validator replays (coordinator/verification.py: a new volunteer's
    # is 10x this). 0: no checks, and workers keep their inner optimizer across rounds (no replay).
    verify_fraction: float = Field(0.025, ge=0, le=1)
    # Where workers fetch shards: "" for the coordinator itself, else an fsspec URL of the prepared
    # directory (https:// with Range support, s3://...). Where the bytes live, not what the run is:
    # it is left out of the run id, so a community can move its shards without starting over.
    data_url: str = ""
    # > 0: after every K-th round's outer step, one member of each averaging group evaluates the
    # parameters on the held-out split and reports the figures (worker/evaluation.py). 0: never.
    # How often a run is measured, not what it trains: left out of the run id, like data_url.
    eval_every_rounds: int = Field(0, ge=0)
    # Average round r while round r+1 trains, its outer step landing one round late (worker/diloco.py):
    # the sync hides behind compute, at some cost in loss (benchmarks/diloco_vs_ddp.py measures it).
    overlap_averaging: bool = False
    bounds: Bounds = Bounds()

    @field_validator("compression", "aggregation")
    @classmethod
    def _known_choice(cls, value: str, info: ValidationInfo) -> str:
        choices = {"compression": COMPRESSIONS, "aggregation": AGGREGATIONS}[info.field_name]
        if value not in choices:
            raise ValueError(f"{info.field_name} {value!r} is not one of {', '.join(choices)}")
        return value

    @model_validator(mode="after")
    def _checks_can_read_what_is_sent(self) -> "RunSettings":
        # A validator compares what a worker sent (the reducers' witnesses) with its replay of the worker's
        # pseudo-gradient. topk2bit sends 1/64 of it plus an error-feedback residual the validator cannot
        # know: honest workers would be convicted.
        if self.compression in UNCHECKABLE_COMPRESSIONS and self.verify_fraction > 0:
            raise ValueError(f"compression {self.compression!r} with verify_fraction {self.verify_fraction}: a "
                             "validator cannot compare a sparse pseudo-gradient with its replay; set "
                             "verify_fraction = 0 (no spot checks) or use compression \"8bit\"")
        return self

    @model_validator(mode="after")
    def _overlap_needs_no_replay(self) -> "RunSettings":
        # Overlapping, a round starts from the global parameters plus the worker's own last round: a
        # start no validator holds, so none could replay it; and the model trains on while its
        # parameters are averaged, so there is no moment to evaluate them beside the report.
        if self.overlap_averaging and (self.verify_fraction > 0 or self.eval_every_rounds > 0):
            raise ValueError(f"overlap_averaging with verify_fraction {self.verify_fraction} and eval_every_rounds "
                             f"{self.eval_every_rounds}: an overlapped round starts where no validator can replay it "
                             "from, and is reported while the next one trains; set verify_fraction = 0 and "
                             "eval_every_rounds = 0 (evaluate checkpoints with `essaim eval`), or turn overlap off")
        return self

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> "RunSettings":
        if self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} is larger than batch_size {self.batch_size}: "
                             "use at most batch_size, or 0 for one pass per batch")
        return self

    @property
    def tokens_per_round(self) -> int:
        """The most tokens one worker trains in one round."""
        return self.inner_steps * self.batch_size * self.seq_len

    @property
    def lease_tokens(self) -> int:
        """The most tokens of one lease: a share of a round, at least one row."""
        return max(self.seq_len, self.tokens_per_round // self.leases_per_round)


class AdmissionSettings(BaseModel):
    """Who Register credits, and how fast one address may register new keys (coordinator/admission.py).

    Kept out of RunSettings: who may join is not what the run trains, so it is left
    out of the run id, like data_url.
    """

    model_config = ConfigDict(extra="forbid")

    # name -> Ed25519 public key (hex) of each admitted institution, for a run without a ledger
    # (a governed run admits institutions by vote). Their certificates credit their workers.
    institutions: dict[str, str] = {}
    institutions_only: bool = False  # refuse workers without a valid certificate (else: volunteers)
    registrations_per_minute: int = Field(60, ge=1)  # new keys per source address, refilled continuously
    registration_burst: int = Field(20, ge=1)        # new keys one address may register at once

    @model_validator(mode="after")
    def _keys_are_keys(self) -> "AdmissionSettings":
        for name, key in self.institutions.items():
            if not name or name == INDEPENDENT:
                raise ValueError(f"institution {name!r}: give the name its certificates carry "
                                 f"({INDEPENDENT!r} names workers no institution certified)")
            if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
                raise ValueError(f"institution {name!r}: its key must be the 64 hex digits "
                                 "`essaim institution keygen` printed")
        return self


class CoordinatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path                  # a prepared corpus: manifest.json, shards, tokenizer/
    database_url: str               # sqlite:///... by default
    host: str = "127.0.0.1"         # the address gRPC and the DHT peer bind (0.0.0.0: every interface)
    port: int = Field(50051, ge=0, le=65535)  # 0: pick a free port
    announce: str = ""              # the address workers dial, when it is not `host` (NAT, 0.0.0.0)
    dht_port: int = Field(0, ge=0, le=65535)  # the DHT peer's TCP port; 0: a free one
    tls_cert: Path | None = None    # PEM certificate and key, both or neither: gRPC over TLS
    tls_key: Path | None = None     # (checked with the files, by ServerTLS.from_options, at start)
    insecure: bool = False          # plaintext on an address other than loopback, knowingly
    run: RunSettings = RunSettings()
    governance: Path | None = None  # the run's ledger (essaim gov init): its votes govern the run
    admission: AdmissionSettings = AdmissionSettings()
    credential_key: Path | None = None  # signs round credentials; default: credential-key.pem in data_dir
    metrics_port: int = Field(0, ge=0, le=65535)    # Prometheus /metrics on `host`; 0: off
    dashboard_port: int = Field(0, ge=0, le=65535)  # the run's live web page on `host`; 0: off
    processes: int = Field(1, ge=1, le=64)  # serving the gRPC port together, on one PostgreSQL database

    @model_validator(mode="after")
    def _processes_share_a_database_server(self) -> "CoordinatorSettings":
        if self.processes > 1 and make_url(self.database_url).get_backend_name() != "postgresql":
            raise ValueError(f"--processes {self.processes} needs a PostgreSQL database (--database "
                             "postgresql+psycopg://...): SQLite lets one process write at a time, so more would only "
                             "wait for each other; serve with --processes 1")
        return self

    @model_validator(mode="after")
    def _governed_institutions_are_voted(self) -> "CoordinatorSettings":
        if self.governance is not None and self.admission.institutions:
            raise ValueError("a governed run admits institutions by vote, not by --admit-institution: its "
                             "maintainers propose {\"institutions\": {\"admit\": {NAME: KEY}}} (essaim gov propose)")
        return self

    @model_validator(mode="after")
    def _views_on_their_own_ports(self) -> "CoordinatorSettings":
        if self.metrics_port and self.metrics_port == self.dashboard_port:
            raise ValueError(f"--metrics-port and --dashboard-port are both {self.metrics_port}: give each its own port")
        return self


def load_run_settings(path: Path) -> RunSettings:
    """Read a run TOML file (keys of RunSettings at top level)."""
    try:
        return RunSettings(**tomllib.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"run settings file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, ValidationError) as error:
        raise ValueError(f"{path}: {error}") from None
