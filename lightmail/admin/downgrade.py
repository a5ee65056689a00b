"""``lightmail db downgrade [--to REV]``: the schema one migration back (or to REV).

For going back to an older LightMail: run it with the version being left (it knows
the migrations to undo), then install the older one.  What a migration added is
gone after its downgrade (a column's values, a table's rows); the mail stays.  It
refuses while a server runs on this state directory, whose code expects the newer
schema.
"""

from __future__ import annotations

import sys

from lightmail.config import Config
from lightmail.queue.wake import WAKE_NAME, listening
from lightmail.storage import migrate
from lightmail.storage.database import create_engine


def refused(message: str) -> int:
    """Exit status 1 with one line on stderr, as the other commands' errors."""
    print(f"lightmail: {message}", file=sys.stderr)
    return 1


def downgrade_command(config: Config, to: str | None) -> int:
    if listening(config.server.state_dir / WAKE_NAME):
        return refused(f"a LightMail server is running on {config.server.state_dir}: "
                       "stop it first (it expects the schema it has)")
    engine = create_engine(config.database, pool_size=1)
    try:
        current = migrate.current_revision(engine)
        try:
            target, steps = migrate.plan_downgrade(current, to)
        except migrate.DowngradeRefused as exc:
            return refused(str(exc))
        for step in steps:
            print(f"undoing {step.revision}: {step.doc}")
        migrate.downgrade(engine, target)
        print(f"schema {current} -> {migrate.current_revision(engine)}; the LightMail "
              f"of revision {target} can run on it (lightmail db upgrade goes forward "
              "again)")
    finally:
        engine.dispose()
    return 0
