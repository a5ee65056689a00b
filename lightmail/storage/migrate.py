"""Schema migrations with Alembic, driven from code (``lightmail db upgrade`` and
``lightmail db downgrade``).

The migration scripts live in ``lightmail/storage/migrations/versions``.  To add one
after changing ``schema.py``, run ``lightmail db revision -m "what changed"`` against a
database at head; autogenerate writes a draft to review.  Every migration has a
downgrade that keeps the mail (``tests/test_migrations.py`` runs each one on a
database holding mail), and before adding one, make the fixture of the revision it
follows: ``python tests/fixtures/schema/make_fixture.py`` (the test fails without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"

#: The newest revision (tests/test_migrations.py checks that it is Alembic's head).
#: Known here so that a process whose schema is current never imports Alembic: with
#: Mako and Pygments, which it brings, some 15 MB in every process that checks.
HEAD = "0016"


def _alembic_config(connection: object) -> AlembicConfig:
    # Alembic is imported only where a migration runs (see HEAD).
    from alembic.config import Config as AlembicConfig
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The head of the migration scripts, as Alembic finds it (:data:`HEAD`)."""
    from alembic.script import ScriptDirectory
    script = ScriptDirectory.from_config(_alembic_config(None))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision (None: no LightMail schema), read from Alembic's
    version table as Alembic does, without Alembic."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        found = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(found) > 1:          # LightMail's history has no branches
        raise RuntimeError(f"the database has several schema revisions: {found}")
    return found[0] if found else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema up to ``revision``; call before the reactor runs
    or from a worker thread."""
    if revision == "head" and current_revision(engine) == HEAD:
        return          # current: no need for Alembic
    from alembic import command
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), revision)


class DowngradeRefused(Exception):
    """The downgrade asked for cannot be done; the message says why."""


@dataclass(frozen=True)
class Step:
    """One migration, as a downgrade would undo it."""

    revision: str
    doc: str                # the first line of its docstring: what it added


def revisions() -> list[Step]:
    """Every revision this LightMail knows, oldest first."""
    from alembic.script import ScriptDirectory
    script = ScriptDirectory.from_config(_alembic_config(None))
    return [Step(s.revision, (s.doc or "").strip().splitlines()[0] if s.doc else "")
            for s in reversed(list(script.walk_revisions()))]


def plan_downgrade(current: str | None, to: str | None = None) -> tuple[str, list[Step]]:
    """The revision a downgrade from ``current`` ends at (``to``, or one step back)
    and the migrations it undoes, newest first.  Refuses an empty database, a
    revision this LightMail does not know (downgrade with the LightMail that made
    it), a target that is not older, and going below the first revision: that
    would drop every table, and the mail with it."""
    known = revisions()
    order = [step.revision for step in known]
    if current is None:
        raise DowngradeRefused("the database has no LightMail schema (nothing to "
                               "downgrade)")
    if current not in order:
        raise DowngradeRefused(
            f"the schema is at {current}, which this LightMail does not know: "
            "downgrade with the LightMail that upgraded it, before installing this one")
    at = order.index(current)
    if to is None:
        if at == 0:
            raise DowngradeRefused(
                f"the schema is at {current}, the first revision: there is no older "
                "schema to go back to (below it are no tables, and no mail)")
        target = order[at - 1]
    elif to not in order:
        raise DowngradeRefused(f"unknown revision {to!r}; this LightMail knows "
                               f"{', '.join(order)}")
    elif order.index(to) >= at:
        raise DowngradeRefused(
            f"the schema is at {current}; {to} is not older"
            + (" (lightmail db upgrade goes forward)" if order.index(to) > at else ""))
    else:
        target = to
    return target, list(reversed(known[order.index(target) + 1:at + 1]))


def revision(engine: Engine, message: str) -> None:
    """Write a draft migration by comparing the database with ``schema.py``."""
    from alembic import command
    with engine.begin() as conn:
        command.revision(_alembic_config(conn), message=message, autogenerate=True)
