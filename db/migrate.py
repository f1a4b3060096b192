"""Run the Alembic migrations from code (``gateway migrate``)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

__all__ = ["alembic_config", "upgrade"]


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url``; no ``alembic.ini`` is needed."""
    cfg = Config()
    cfg.set_main_option("script_location", "db:migrations")
    # Passed beside the config rather than through it: Config interpolates "%".
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at ``database_url`` up to ``revision``.

    Creates the folder of a SQLite file first, so a fresh checkout works.
    """
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)
