"""Schema migrations with Alembic, driven from code (``lightmail db upgrade``).

The migration scripts live in ``lightmail/storage/migrations/versions``.  To add one
after changing ``schema.py``, run ``lightmail db revision -m "what changed"`` against a
database at head; autogenerate writes a draft to review.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).parent / "migrations"


def _alembic_config(connection: object) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    script = ScriptDirectory.from_config(_alembic_config(None))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema up to ``revision``; call before the reactor runs
    or from a worker thread."""
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), revision)


def revision(engine: Engine, message: str) -> None:
    """Write a draft migration by comparing the database with ``schema.py``."""
    with engine.begin() as conn:
        command.revision(_alembic_config(conn), message=message, autogenerate=True)
