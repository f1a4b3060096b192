"""Fresh PostgreSQL databases for a benchmark run, made on a server and dropped after."""

from __future__ import annotations

import asyncio
import secrets

import sqlalchemy as sa

from gateway.settings import normalize_database_url

__all__ = ["create_database", "drop_database"]


def _admin(server_url: str, statement: str) -> None:
    import asyncpg

    url = sa.make_url(normalize_database_url(server_url)).set(drivername="postgresql")

    async def run() -> None:
        conn = await asyncpg.connect(url.render_as_string(hide_password=False))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def create_database(server_url: str) -> str:
    """A new, empty database on ``server_url``; its URL."""
    name = f"gw_bench_{secrets.token_hex(4)}"
    _admin(server_url, f'CREATE DATABASE "{name}"')
    url = sa.make_url(normalize_database_url(server_url)).set(database=name)
    return url.render_as_string(hide_password=False)


def drop_database(server_url: str, database_url: str) -> None:
    name = sa.make_url(database_url).database
    _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
