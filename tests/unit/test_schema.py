"""The schema gate: behind refuses, right serves, and a newer database (a
rolling deploy migrated it under a running release) is said once in the log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.engine import Database
from db.migrate import upgrade
from gateway.schema import SchemaGate


def test_a_database_migrated_under_a_running_gateway_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}"
    upgrade(url)

    async def scenario() -> None:
        db = Database(url)
        gate = SchemaGate(db)
        try:
            await gate.require()
            assert gate.ok
            await db.write(
                lambda conn: conn.execute(
                    sa.text("UPDATE alembic_version SET version_num = '9999_next_release'")
                )
            )
            with caplog.at_level(logging.WARNING, logger="gateway.schema"):
                for _ in range(3):
                    gate._next_check = 0.0  # as if NEWER_CHECK_SECONDS went by
                    await gate.require()  # still serving
        finally:
            await db.dispose()

    asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "newer than this release" in r.getMessage()]
    assert len(said) == 1 and "9999_next_release" in said[0]
