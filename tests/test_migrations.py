"""Alembic migrations build exactly the schema in schema.py, on every backend."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lightmail.storage import migrate
from lightmail.storage.database import create_engine
from lightmail.storage.schema import metadata


def test_upgrade_matches_schema_and_downgrades_cleanly(db_url: str) -> None:
    engine = create_engine(db_url, pool_size=1)
    try:
        assert migrate.current_revision(engine) is None
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == [], f"migrations and schema.py disagree: {diff}"
        migrate.upgrade(engine)  # idempotent
        migrate.downgrade(engine, "base")
        tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set()
        migrate.upgrade(engine)
        assert set(metadata.tables) <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
