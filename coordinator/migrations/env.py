"""Alembic environment: migrations run on the connection coordinator.store.migrate hands over.

To write a new migration after changing coordinator/store.py:
    python -m coordinator.migrations "what changed"
"""

from alembic import context

from coordinator.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through coordinator.store.migrate (or python -m coordinator.migrations)")
# Batch mode lets SQLite, which cannot ALTER most things, take the same migrations as PostgreSQL.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
