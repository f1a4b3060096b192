"""API keys: requests that miss the cache together share one database read."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from db.engine import Database
from gateway.auth.keys import ApiKeyAuth, create_api_key
from gateway.errors import Unauthorized


def test_requests_that_miss_a_key_together_share_one_read(tmp_path: Path) -> None:
    """64 requests with one key, none cached (a cold process, or the entry
    just ran out under load): one read of ``api_keys``, and every request
    gets the key's project. A bad key read by 8 at once: one read, and each
    hears that it is not valid. A request that goes away leaves the read to
    the others."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    made = sa.create_engine(url)
    SQLModel.metadata.create_all(made)
    made.dispose()
    db = Database(url)
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "FROM api_keys" in statement:
            reads.append(statement)

    async def main() -> None:
        project_id, key = await create_api_key(db, "keys")
        assert db._sync_engine is not None  # SQLite's reads: the sync engine, in threads
        sa.event.listen(db._sync_engine, "before_cursor_execute", count)
        auth = ApiKeyAuth(db, ttl=60)
        principals = await asyncio.gather(*(auth.resolve(key) for _ in range(64)))
        assert {p.project_id for p in principals} == {project_id}
        assert len(reads) == 1
        assert (await auth.resolve(key)).project_id == project_id  # cached now
        assert len(reads) == 1

        reads.clear()
        bad = await asyncio.gather(
            *(auth.resolve("gw_not-a-key") for _ in range(8)), return_exceptions=True
        )
        assert all(isinstance(b, Unauthorized) for b in bad), bad
        assert len(reads) == 1

        reads.clear()
        other = ApiKeyAuth(db, ttl=60)
        first = asyncio.ensure_future(other.resolve(key))
        second = asyncio.ensure_future(other.resolve(key))
        await asyncio.sleep(0)  # both waiting on the read
        first.cancel()
        assert (await second).project_id == project_id
        with pytest.raises(asyncio.CancelledError):
            await first
        assert len(reads) == 1

    async def scenario() -> None:
        try:
            await main()
        finally:
            await db.dispose()

    asyncio.run(scenario())
