"""``gateway backup PATH`` and ``gateway restore PATH``: the database of record
and its artifacts, copied while the gateway runs, and put back.

A backup is a folder:

- ``manifest.json``: when, from which database kind, at which schema revision,
  and how many artifact files;
- ``gateway.db``: a SQLite database, copied with SQLite's online backup API
  (one consistent snapshot; writers go on meanwhile, readers are never
  blocked in WAL mode);
- ``gateway.pgdump``: a PostgreSQL database, from ``pg_dump --format=custom``
  (one consistent snapshot in a repeatable-read transaction);
- ``artifacts/``: the files of ``ARTIFACT_STORE=local``, copied *after* the
  database: a file is written before its row, and none is ever deleted, so
  every artifact the copied database names has its file (with
  ``ARTIFACT_STORE=database`` they are rows of the dump).

Redis is not in it: it holds queues and wake-ups, all of which the database
of record can make again. After a restore, the reconciler queues again every
run whose job is not in Redis, and runs that were executing end ``worker_lost``
and run again (docs/operations.md#backups).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from gateway.settings import Settings
from jobs.settings import ConfigError

__all__ = ["backup", "restore"]

T = TypeVar("T")

MANIFEST = "manifest.json"
SQLITE_FILE = "gateway.db"
PG_FILE = "gateway.pgdump"
ARTIFACTS = "artifacts"


def _sqlite_path(url: str) -> Path:
    database = sa.make_url(url).database
    if not database or database == ":memory:":
        raise ConfigError("DATABASE_URL", "backup needs a SQLite database in a file")
    return Path(database)


def _libpq_url(url: str) -> str:
    """The URL as pg_dump and pg_restore take it: no SQLAlchemy driver, no
    ``pgbouncer`` flag (libpq's own ``sslmode`` stays)."""
    made = sa.make_url(url)
    query = {k: v for k, v in made.query.items() if k != "pgbouncer"}
    return made.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ConfigError(
            "DATABASE_URL",
            f"a PostgreSQL backup needs {name} (the postgresql-client package) on PATH",
        )
    return found


def _revision(url: str) -> str:
    from alembic.runtime.migration import MigrationContext

    heads = _read(url, lambda conn: MigrationContext.configure(conn).get_current_heads())
    return ",".join(sorted(heads))


def _copy_artifacts(source: Path, target: Path) -> int:
    """Every finished artifact file under ``source`` into ``target`` (a file
    being written is a ``.partial`` and has no row yet)."""
    count = 0
    if not source.is_dir():
        return count
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.suffix == ".partial":
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        count += 1
    return count


def backup(settings: Settings, folder: Path) -> dict[str, Any]:
    """Copy the database and the artifacts into ``folder`` (new or empty)."""
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError("PATH", f"{folder} is not empty: a backup goes into a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    url = settings.database_url
    manifest: dict[str, Any] = {
        "format": 1,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "revision": _revision(url),
        "artifact_store": settings.artifact_store,
    }
    if url.startswith("sqlite"):
        manifest["database"] = "sqlite"
        source = sqlite3.connect(f"file:{_sqlite_path(url)}?mode=ro", uri=True)
        target = sqlite3.connect(folder / SQLITE_FILE)
        try:
            with target:
                source.backup(target)  # every page in one step: one snapshot
        finally:
            target.close()
            source.close()
    else:
        manifest["database"] = "postgresql"
        subprocess.run(
            [
                _tool("pg_dump"),
                "--format=custom",
                "--no-owner",
                "--no-privileges",
                "--file",
                str(folder / PG_FILE),
                _libpq_url(url),
            ],
            check=True,
        )
    manifest["artifact_files"] = (
        _copy_artifacts(settings.artifact_path, folder / ARTIFACTS)
        if settings.artifact_store == "local"
        else 0
    )
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read(url: str, fn: Callable[[sa.Connection], T]) -> T:
    from db.engine import Database

    async def read() -> T:
        db = Database(url)
        try:
            return await db.read(fn)
        finally:
            await db.dispose()

    return asyncio.run(read())


def _is_empty(url: str) -> bool:
    return not _read(url, lambda conn: sa.inspect(conn).get_table_names())


def restore(settings: Settings, folder: Path, *, force: bool = False) -> dict[str, Any]:
    """Put the backup in ``folder`` into ``DATABASE_URL`` and ``ARTIFACT_DIR``,
    then migrate it to this release's schema. Refuses a database that has
    tables unless ``force``."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError("PATH", f"{folder} holds no backup ({MANIFEST} is missing)")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    url = settings.database_url
    kind = "sqlite" if url.startswith("sqlite") else "postgresql"
    if manifest["database"] != kind:
        raise ConfigError(
            "DATABASE_URL",
            f"the backup is of a {manifest['database']} database; DATABASE_URL is {kind}",
        )
    if kind == "sqlite":
        target = _sqlite_path(url)
        if target.exists() and target.stat().st_size > 0 and not force:
            raise ConfigError("DATABASE_URL", f"{target} exists; pass --force to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".restoring")
        shutil.copyfile(folder / SQLITE_FILE, partial)
        for stale in (
            target.with_name(target.name + "-wal"),
            target.with_name(target.name + "-shm"),
        ):
            stale.unlink(missing_ok=True)
        os.replace(partial, target)
    else:
        if not force and not _is_empty(url):
            raise ConfigError(
                "DATABASE_URL", "the database has tables; pass --force to replace them"
            )
        subprocess.run(
            [
                _tool("pg_restore"),
                "--no-owner",
                "--no-privileges",
                "--clean",
                "--if-exists",
                "--exit-on-error",
                "--dbname",
                _libpq_url(url),
                str(folder / PG_FILE),
            ],
            check=True,
        )
    restored = _copy_artifacts(folder / ARTIFACTS, settings.artifact_path)
    from db.migrate import upgrade

    upgrade(url)
    return {"restored_from": manifest["created_at"], "artifact_files": restored}
