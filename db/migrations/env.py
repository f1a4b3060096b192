"""Alembic environment: runs migrations over the same async drivers as the app."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import db.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from db.engine import postgres_connection

config = context.config
target_metadata = SQLModel.metadata

#: The PostgreSQL advisory lock a migration holds (any fixed number of ours).
MIGRATION_LOCK = 0x6777_6D69  # "gwmi"


def _url() -> str:
    url = config.attributes.get("database_url")
    if not url:
        raise RuntimeError("no database URL given to the migrations")
    return str(url)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Gateways that migrate as they start (MIGRATE_ON_START) take
            # turns: the second finds the work done once the lock is its.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


async def _run_async() -> None:
    url, connect_args = postgres_connection(_url())
    engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    async with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            # WAL is a property of the file: set once, it stays.
            await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
