"""The store's schema comes from Alembic migrations, on SQLite and on PostgreSQL alike."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from coordinator.store import Base, SchemaError, open_engine


def test_migrations_build_exactly_the_schema_the_models_describe(database_url: str) -> None:
    engine = open_engine(database_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
    open_engine(database_url)  # a second start finds nothing to migrate


def test_a_database_made_before_migrations_is_refused_with_what_to_do(database_url: str) -> None:
    engine = create_engine(database_url)
    Base.metadata.tables["meta"].create(engine)
    with pytest.raises(SchemaError, match="no migration history .* start from a fresh database"):
        open_engine(database_url)
    assert inspect(engine).get_table_names() == ["meta"]  # nothing was changed
