"""Run the Alembic migrations from code (``gateway migrate``), and tell whether
a database is at the revision this code needs (``gateway web`` checks it at start)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.engine import Database

__all__ = ["SchemaState", "alembic_config", "schema_state", "upgrade"]


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url``; no ``alembic.ini`` is needed."""
    cfg = Config()
    cfg.set_main_option("script_location", "db:migrations")
    # Passed beside the config rather than through it: Config interpolates "%".
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at ``database_url`` up to ``revision``.

    Creates the folder of a SQLite file first, so a fresh checkout works. On
    PostgreSQL the migration holds an advisory lock (``db/migrations/env.py``),
    so gateways that all migrate as they start take turns.
    """
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


@dataclasses.dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands against this code's migrations."""

    #: The revisions the database is at (empty: never migrated).
    current: frozenset[str]
    #: The revisions this code's migrations end at.
    heads: frozenset[str]
    #: Revisions in the database that this code does not know: a newer
    #: release migrated it (a rollback, or a rolling deploy under way).
    unknown: frozenset[str]

    @property
    def is_current(self) -> bool:
        return self.current == self.heads

    @property
    def is_behind(self) -> bool:
        """The database lacks migrations this code needs (or has none at all)."""
        return not self.is_current and not self.unknown

    def problem(self) -> str | None:
        """What is wrong, in words that say what to do; ``None`` when nothing is."""
        if not self.current:
            return "the database has no schema yet: run `gateway migrate` first"
        if self.is_behind:
            return (
                f"the database schema is at revision {', '.join(sorted(self.current))} and "
                f"this gateway needs {', '.join(sorted(self.heads))}: run `gateway migrate`"
            )
        return None


async def schema_state(db: Database) -> SchemaState:
    """The revisions ``db`` is at, against this code's migrations."""
    script = ScriptDirectory.from_config(alembic_config(db.url))
    known = {revision.revision for revision in script.walk_revisions()}

    def current(conn: sa.Connection) -> frozenset[str]:
        # Alembic says which dialect it found at INFO: a line per start is noise.
        logger = logging.getLogger("alembic.runtime.migration")
        level = logger.level
        logger.setLevel(max(level, logging.WARNING))
        try:
            return frozenset(MigrationContext.configure(conn).get_current_heads())
        finally:
            logger.setLevel(level)

    revisions = await db.read(current)
    return SchemaState(
        current=revisions,
        heads=frozenset(script.get_heads()),
        unknown=frozenset(revisions - known),
    )
