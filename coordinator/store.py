"""The coordinator's state in SQL (SQLAlchemy 2): SQLite by default, any URL SQLAlchemy knows.

Everything the coordinator knows lives here, so the process can be killed and
restarted. Token accounting works on `TokenRange` rows: for each shard and epoch
the ranges tile [0, tokens) exactly, each one in the pool, leased or trained.
"""

from __future__ import annotations

import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger, ForeignKey, Index, LargeBinary, String, Text, UniqueConstraint, create_engine, event, inspect, select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from model.shards import Manifest


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Run-level facts (run id, corpus root hash) that must not change across restarts."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Worker(Base):
    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    name: Mapped[str] = mapped_column(String(128))
    institution: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(128))
    precision: Mapped[str] = mapped_column(String(8), default="fp32", server_default="fp32")  # autocast: fp32 | bf16
    registered_at: Mapped[float]
    last_seen: Mapped[float] = mapped_column(index=True)
    last_round: Mapped[int] = mapped_column(default=0)
    last_loss: Mapped[float | None] = mapped_column(default=None)
    tokens_per_second: Mapped[float] = mapped_column(default=0.0)  # calibrated at join, then measured each round
    # Declared at Register (see RegisterRequest); defaults fit a worker that declared nothing.
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    bandwidth_mbit: Mapped[float] = mapped_column(default=0.0, server_default="0")
    trust_class: Mapped[str] = mapped_column(String(16), default="volunteer", server_default="volunteer")
    available_until: Mapped[float] = mapped_column(default=0.0, server_default="0")  # 0: open-ended
    slurm_job_id: Mapped[str] = mapped_column(String(32), default="", server_default="")
    # Leases that expired in a row: each one halves the next lease and doubles the back-off.
    failures: Mapped[int] = mapped_column(default=0, server_default="0")
    backoff_until: Mapped[float] = mapped_column(default=0.0, server_default="0")
    # Checked work (coordinator/verification.py). The hivemind peer id it last leased with, as its round
    # credential names it: a reducer's witness names senders by peer id, and this maps one to its worker.
    peer_id: Mapped[str] = mapped_column(String(128), default="", server_default="")
    passed_checks: Mapped[int] = mapped_column(default=0, server_default="0")  # fewer: sampled more often
    # Set by a failed check: no more leases, no more credit. The round and check say which work failed.
    quarantined_at: Mapped[float | None] = mapped_column(default=None, index=True)  # few: read at each report
    quarantine_round: Mapped[int | None] = mapped_column(default=None)
    quarantine_check: Mapped[int | None] = mapped_column(default=None)  # a check id (no foreign key: checks name workers)
    quarantine_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    # Declared at Register: the carbon intensity of its electricity (gCO2e/kWh). 0: not declared.
    grid_gco2_per_kwh: Mapped[float] = mapped_column(default=0.0, server_default="0")


class Source(Base):
    """A corpus source; ``weight`` sets its share of leased tokens (see scheduler)."""

    __tablename__ = "sources"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    language: Mapped[str] = mapped_column(String(32))
    licence: Mapped[str] = mapped_column(String(256))
    weight: Mapped[float]
    date_from: Mapped[str] = mapped_column(String(10))
    date_to: Mapped[str] = mapped_column(String(10))
    # Tokens of its ranges leased or trained, all epochs: kept up to date by the scheduler, so
    # choosing the next lease's source reads a few rows instead of summing every range.
    assigned_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Shard(Base):
    __tablename__ = "shards"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    file: Mapped[str] = mapped_column(String(256))
    sha256: Mapped[str] = mapped_column(String(64))
    tokens: Mapped[int]
    dtype: Mapped[str] = mapped_column(String(16))
    language: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(ForeignKey("sources.name"))
    licence: Mapped[str] = mapped_column(String(256))
    date_from: Mapped[str] = mapped_column(String(10))  # ISO dates: leases go oldest first within a source
    date_to: Mapped[str] = mapped_column(String(10))
    __table_args__ = (Index("ix_shards_source_date", "source", "date_from"),)


class TokenRange(Base):
    __tablename__ = "token_ranges"
    id: Mapped[int] = mapped_column(primary_key=True)
    shard_id: Mapped[str] = mapped_column(ForeignKey("shards.id"))
    epoch: Mapped[int]
    start: Mapped[int]
    end: Mapped[int]
    state: Mapped[str] = mapped_column(String(16))  # pool | leased | trained
    # The shard's source and first date, copied here so that the next range to lease is one index lookup.
    source: Mapped[str] = mapped_column(String(128), server_default="")
    shard_date: Mapped[str] = mapped_column(String(10), server_default="")
    __table_args__ = (Index("ix_ranges_next", "state", "source", "epoch", "shard_date", "shard_id", "start"),)

    def piece(self, start: int, end: int, state: str) -> "TokenRange":
        """Another range of the same shard and epoch."""
        return TokenRange(shard_id=self.shard_id, epoch=self.epoch, start=start, end=end, state=state,
                          source=self.source, shard_date=self.shard_date)

    @staticmethod
    def whole(shard: "Shard", epoch: int) -> "TokenRange":
        return TokenRange(shard_id=shard.id, epoch=epoch, start=0, end=shard.tokens, state="pool",
                          source=shard.source, shard_date=shard.date_from)


class Lease(Base):
    __tablename__ = "leases"
    id: Mapped[int] = mapped_column(primary_key=True)
    range_id: Mapped[int] = mapped_column(ForeignKey("token_ranges.id"))
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"))
    shard_id: Mapped[str] = mapped_column(ForeignKey("shards.id"))
    epoch: Mapped[int]
    start: Mapped[int]
    end: Mapped[int]
    round: Mapped[int]
    attempt: Mapped[int]  # how many times this range's start was leased before, plus one
    state: Mapped[str] = mapped_column(String(16))  # granted | completed | released | expired | rewound
    deadline: Mapped[float]
    granted_at: Mapped[float]
    finished_at: Mapped[float | None] = mapped_column(default=None)
    tokens_consumed: Mapped[int] = mapped_column(default=0)
    __table_args__ = (
        Index("ix_leases_state_deadline", "state", "deadline"),
        Index("ix_leases_worker_state", "worker_id", "state"),
        Index("ix_leases_range", "shard_id", "epoch", "start"),  # a range's earlier attempts
        Index("ix_leases_round_state", "round", "state"),  # a round's leases out, read at each report's decision
    )


class RequestNonce(Base):
    """A signed request's nonce, remembered while its timestamp is acceptable, when several coordinator processes
    share the database: a request replayed to another process is refused there too (coordinator/shared_nonces.py)."""

    __tablename__ = "request_nonces"
    worker_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(16), primary_key=True)
    forget_at: Mapped[float] = mapped_column(index=True)


class Round(Base):
    __tablename__ = "rounds"
    number: Mapped[int] = mapped_column(primary_key=True)
    first_report_at: Mapped[float]
    reports: Mapped[int] = mapped_column(default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    loss_sum: Mapped[float] = mapped_column(default=0.0)
    max_group_size: Mapped[int] = mapped_column(default=0)
    params_digest: Mapped[str] = mapped_column(String(64))  # what every accepted report of the round agrees on


class FiledReport(Base):
    """A worker's report of a round, kept until the round is decided (coordinator/rounds.py), then its outcome."""

    __tablename__ = "round_reports"
    id: Mapped[int] = mapped_column(primary_key=True)
    round: Mapped[int] = mapped_column(index=True)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"))
    params_digest: Mapped[str] = mapped_column(String(64))
    held_tokens: Mapped[int] = mapped_column(BigInteger)  # the sizes of the report's leases: its group's stake
    report: Mapped[str] = mapped_column(Text)  # the RoundReport as JSON, members' vouched usage included
    received_at: Mapped[float]
    outcome: Mapped[str] = mapped_column(String(16))  # pending | kept | not_kept | quarantined (dropped)
    # What a check of the report needs: the worker's peer id when it filed (a witness names senders by
    # peer id), and the report's claim and witnesses as a CompleteRoundRequest holding only those two.
    peer_id: Mapped[str] = mapped_column(String(128), default="", server_default="")
    evidence: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)  # None: it carried neither
    __table_args__ = (
        UniqueConstraint("round", "worker_id"),
        # Each report sums its round's pending stakes per digest (rounds.py): from this index alone.
        Index("ix_round_reports_stakes", "round", "outcome", "params_digest", "held_tokens", "received_at", "worker_id"),
    )


class Check(Base):
    """A kept report to replay, sampled or triggered by a witness; a validator's verdict (coordinator/verification.py)."""

    __tablename__ = "checks"
    id: Mapped[int] = mapped_column(primary_key=True)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"))
    round: Mapped[int]  # with worker_id, names the kept report it replays (a rewind deletes reports, not checks)
    status: Mapped[str] = mapped_column(String(16))  # pending | assigned | passed | failed | inconclusive
    trigger: Mapped[str] = mapped_column(String(256))  # "sampled" | "anomaly: <what a witness showed>"
    created_at: Mapped[float]
    # The validator it is assigned to; while pending again after an inconclusive verdict, the one that gave it.
    validator_id: Mapped[str | None] = mapped_column(ForeignKey("workers.id"), default=None)
    assigned_at: Mapped[float | None] = mapped_column(default=None)
    decided_at: Mapped[float | None] = mapped_column(default=None)
    inconclusive: Mapped[int] = mapped_column(default=0, server_default="0")  # verdicts so: the first re-queues it
    # The verdict, as the validator gave it.
    reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    exact: Mapped[bool | None] = mapped_column(default=None)
    cosine: Mapped[float | None] = mapped_column(default=None)
    norm_ratio: Mapped[float | None] = mapped_column(default=None)
    __table_args__ = (UniqueConstraint("worker_id", "round"), Index("ix_checks_status", "status", "id"))


class Contribution(Base):
    """One worker's part in one round: what it trained and what averaging cost it."""

    __tablename__ = "contributions"
    id: Mapped[int] = mapped_column(primary_key=True)
    round: Mapped[int]
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"))
    tokens: Mapped[int] = mapped_column(BigInteger)
    loss: Mapped[float]
    group_size: Mapped[int]
    bytes_sent: Mapped[int] = mapped_column(BigInteger)  # a 7B model's fp32 pseudo-gradient is 28 GB
    inner_seconds: Mapped[float]
    wall_seconds: Mapped[float]
    params_digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float]
    # What the round cost its device (worker/energy.py): measured ("nvml", "rapl") or an "estimate".
    energy_joules: Mapped[float] = mapped_column(default=0.0, server_default="0")
    energy_method: Mapped[str] = mapped_column(String(16), default="", server_default="")


class Evaluation(Base):
    """Held-out figures of the parameters after a round's outer step, one row per group and name."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(primary_key=True)
    round: Mapped[int]
    params_digest: Mapped[str] = mapped_column(String(64))
    group: Mapped[str] = mapped_column(String(16))   # all | language | source
    name: Mapped[str] = mapped_column(String(128))   # "all", a language code or a source name
    tokens: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)   # UTF-8 bytes of the held-out text
    loss: Mapped[float]                              # nats per token
    bits_per_byte: Mapped[float]
    worker_id: Mapped[str] = mapped_column(String(64), default="", server_default="")  # who evaluated
    created_at: Mapped[float]
    __table_args__ = (UniqueConstraint("round", "group", "name"),)  # the first report's figures are kept


class LineageRecord(Base):
    """Which tokens were trained, by whom, in which round, under which config."""

    __tablename__ = "lineage"
    id: Mapped[int] = mapped_column(primary_key=True)
    round: Mapped[int]
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id"))
    institution: Mapped[str] = mapped_column(String(128))
    lease_id: Mapped[int] = mapped_column(ForeignKey("leases.id"), unique=True)
    shard_id: Mapped[str] = mapped_column(ForeignKey("shards.id"))
    epoch: Mapped[int]
    start: Mapped[int]
    end: Mapped[int]
    loss: Mapped[float]
    pseudo_gradient_digest: Mapped[str] = mapped_column(String(64))
    config_version: Mapped[str] = mapped_column(String(64))
    # The hardware and precision that trained these tokens, as the worker declared them at Register.
    device: Mapped[str] = mapped_column(String(128), default="", server_default="")
    precision: Mapped[str] = mapped_column(String(8), default="", server_default="")
    created_at: Mapped[float]
    rewound_at: Mapped[float | None] = mapped_column(default=None)  # set: no model holds these tokens any more
    # What a check of the round's report found: unverified (none passed yet) | verified | rejected.
    verification: Mapped[str] = mapped_column(String(16), default="unverified", server_default="unverified")
    # Its share, by tokens, of the energy its worker's round took (Contribution.energy_joules).
    energy_joules: Mapped[float] = mapped_column(default=0.0, server_default="0")
    __table_args__ = (Index("ix_lineage_worker_round", "worker_id", "round"),)  # a verdict credits one round


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaError(ValueError):
    """A database whose schema the migrations cannot bring up to date."""


class MissingDatabase(ValueError):
    """A SQLite file that a command expected to find, not to create."""


def open_engine(database_url: str, create: bool = True) -> Engine:
    """An engine on the database, its schema migrated to the newest revision (Alembic).

    With ``create=False`` a SQLite URL naming a file that does not exist is refused, and no file
    is made: commands that read a run's records (rewind) must not start an empty one.
    """
    if not create:
        _require_sqlite_file(database_url)
    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        # WAL lets readers (status, tests) look while the coordinator writes;
        # the busy timeout makes concurrent writers wait instead of failing.
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode, NORMAL survives a killed process (the coordinator's crash); only a power
            # loss may undo the last transactions, and their leases then simply come back to the pool.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    migrate(engine)
    return engine


def _require_sqlite_file(database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or url.query.get("uri"):
        return  # a server's database, an in-memory one, or a file: URI this check does not parse
    path = Path(url.database)
    if not path.is_file():
        raise MissingDatabase(
            f"no database at {path.resolve()}, and none was created: point --data at the run's directory "
            "(the one holding its coordinator.db) or --database at the run's database"
        )


def alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    with engine.begin() as connection:
        tables = set(inspect(connection).get_table_names())
        if tables and "alembic_version" not in tables:
            raise SchemaError(
                f"{engine.url.render_as_string(hide_password=True)} holds tables but no migration history "
                "(made before Essaim had migrations): start from a fresh database"
            )
        command.upgrade(alembic_config(connection), "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def load_manifest(sessions: sessionmaker[Session], manifest: Manifest) -> None:
    """Put the corpus into the store once; refuse to mix two corpora in one database."""
    root = manifest.root_hash()
    with sessions.begin() as session:
        known = session.get(Meta, "corpus_root_hash")
        if known is not None:
            if known.value != root:
                raise ValueError(
                    f"this database already holds corpus {known.value[:12]}, not {root[:12]}: "
                    "use a fresh database (--database) for a new corpus"
                )
            return
        session.add(Meta(key="corpus_root_hash", value=root))
        session.add(Meta(key="created_at", value=str(time.time())))
        for source in manifest.sources:
            session.add(
                Source(
                    name=source.name, language=source.language, licence=source.licence, weight=source.weight,
                    date_from=source.date_from, date_to=source.date_to,
                )
            )
        session.flush()  # sources before the shards that refer to them
        for info in manifest.shards:
            shard = Shard(
                id=info.shard_id, file=info.file, sha256=info.sha256, tokens=info.tokens,
                dtype=info.dtype, language=info.language, source=info.source, licence=info.licence,
                date_from=info.date_from, date_to=info.date_to,
            )
            session.add(shard)
            session.add(TokenRange.whole(shard, epoch=0))


def insert_if_absent(session: Session, table, key: list[str]):  # type: ignore[no-untyped-def]
    """An INSERT into `table`, in the session's dialect, that skips rows whose `key` exists (ON CONFLICT DO
    NOTHING): where two processes may insert the same row, both succeed and one row is kept."""
    insert = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}[session.get_bind().dialect.name]
    return insert(table).on_conflict_do_nothing(index_elements=key)


def flushed_connection(session: Session) -> Connection:
    """The session's connection, its pending ORM changes written first: plain SQL (grant_sql.py, report_sql.py)
    then sees what the ORM did in the same transaction, as the ORM's own queries do (autoflush)."""
    session.flush()
    return session.connection()


def count_assigned(session: Session, source: str, tokens: int) -> None:
    """Add ``tokens`` (negative: remove) to the source's count of leased and trained tokens.

    Every change of a range between the pool and leased/trained goes through here.
    """
    session.execute(update(Source).where(Source.name == source).values(assigned_tokens=Source.assigned_tokens + tokens))


def meta_value(session: Session, key: str) -> str | None:
    row = session.scalar(select(Meta).where(Meta.key == key))
    return row.value if row else None
