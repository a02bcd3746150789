"""The store's schema comes from Alembic migrations, on SQLite and on PostgreSQL alike."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from coordinator.store import Base, SchemaError, alembic_config, open_engine


def test_migrations_build_exactly_the_schema_the_models_describe(database_url: str) -> None:
    engine = open_engine(database_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        head = ScriptDirectory.from_config(alembic_config(connection)).get_current_head()
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    open_engine(database_url)  # a second start finds nothing to migrate


def test_a_database_made_before_migrations_is_refused_with_what_to_do(database_url: str) -> None:
    engine = create_engine(database_url)
    Base.metadata.tables["meta"].create(engine)
    with pytest.raises(SchemaError, match="no migration history .* start from a fresh database"):
        open_engine(database_url)
    assert inspect(engine).get_table_names() == ["meta"]  # nothing was changed


def test_a_database_at_the_first_revision_upgrades_keeping_its_rows(database_url: str) -> None:
    from alembic import command

    engine = create_engine(database_url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0001")
        connection.execute(text(
            "INSERT INTO workers (id, public_key, name, institution, device, registered_at, last_seen, last_round, "
            "tokens_per_second) VALUES ('w', :key, 'w', 'lab', 'cpu', 0, 0, 3, 0)"), {"key": b"k" * 32})
        connection.execute(text("INSERT INTO sources VALUES ('wiki', 'fr', 'CC0', 1.0, '2020-01-01', '2020-12-31')"))
        connection.execute(text(
            "INSERT INTO shards VALUES ('wiki-0', 'wiki-0.bin', :sha, 100, 'uint16', 'fr', 'wiki', 'CC0', "
            "'2020-03-01', '2020-04-01')"), {"sha": "0" * 64})
        connection.execute(text('INSERT INTO token_ranges (shard_id, epoch, start, "end", state) VALUES '
                                "('wiki-0', 0, 0, 30, 'trained'), ('wiki-0', 0, 30, 40, 'leased'), "
                                "('wiki-0', 0, 40, 100, 'pool')"))
    open_engine(database_url)
    with engine.connect() as connection:
        row = connection.execute(text("SELECT last_round, trust_class, failures, precision FROM workers")).one()
        assert tuple(row) == (3, "volunteer", 0, "fp32")  # a worker from before precisions trained in fp32
        assert connection.execute(text("SELECT assigned_tokens FROM sources")).scalar() == 40
        ranges = connection.execute(text("SELECT DISTINCT source, shard_date FROM token_ranges")).all()
        assert [tuple(r) for r in ranges] == [("wiki", "2020-03-01")]
