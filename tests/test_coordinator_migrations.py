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
    open_engine(database_url)
    with engine.connect() as connection:
        row = connection.execute(text("SELECT last_round, trust_class, failures FROM workers")).one()
    assert tuple(row) == (3, "volunteer", 0)
