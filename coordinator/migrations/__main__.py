"""Write a new migration from the difference between the models and the migrated schema.

    python -m coordinator.migrations "add worker capabilities"
"""

import sys
import tempfile
from pathlib import Path

from alembic import command

from coordinator.store import alembic_config, open_engine, sqlite_url

versions = Path(__file__).parent / "versions"
number = max((int(p.name[:4]) for p in versions.glob("[0-9][0-9][0-9][0-9]_*.py")), default=0) + 1
with tempfile.TemporaryDirectory() as scratch:
    engine = open_engine(sqlite_url(Path(scratch) / "head.db"))  # an empty database, migrated to head
    with engine.begin() as connection:
        config = alembic_config(connection)
        command.revision(config, message=" ".join(sys.argv[1:]) or "change", autogenerate=True, rev_id=f"{number:04d}")
