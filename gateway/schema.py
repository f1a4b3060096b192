"""Is the database at the schema this code needs? (docs/architecture.md, "Deploying")

``gateway web`` refuses to start on a database it can see is behind. One it
cannot reach at start is checked when it first answers: until a check passes,
``/readyz`` and every API call answer 503 with what to do, never a 500 per
request for a table that is not there. A passed check is kept; a failed one is
tried again every few seconds, so running ``gateway migrate`` is enough.

A passed check is looked at again now and then (``NEWER_CHECK_SECONDS``): in a
rolling deploy the next release migrates the database under this one, which
goes on serving and says once in its log that the database is newer than it
knows.
"""

from __future__ import annotations

import asyncio
import logging
import time

from db.engine import Database
from db.migrate import schema_state
from gateway.errors import ServiceUnavailable

__all__ = ["SchemaGate"]

log = logging.getLogger("gateway.schema")

#: Seconds between two checks of a schema found behind (or not checked yet).
RECHECK_SECONDS = 2.0
#: Seconds between two looks at a schema found right: has a newer release
#: migrated it since?
NEWER_CHECK_SECONDS = 30.0


class SchemaGate:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.ok = False
        self._problem: str | None = None
        self._next_check = 0.0
        self._lock = asyncio.Lock()
        self._told_newer = False

    async def problem(self) -> str | None:
        """What keeps this gateway from serving, or ``None``; a database that
        does not answer is no problem of the schema (its calls say so)."""
        if time.monotonic() < self._next_check:
            return self._problem
        async with self._lock:
            if time.monotonic() < self._next_check:
                return self._problem
            try:
                state = await schema_state(self.db)
            except Exception as exc:  # not answering: a later call checks again
                log.debug("could not check the database schema: %s", exc)
                return None
            if self.ok:  # once right, it stays right for this release
                self._next_check = time.monotonic() + NEWER_CHECK_SECONDS
                self._tell_newer(state.unknown)
                return None
            self._problem = state.problem()
            if self._problem is None:
                self.ok = True
                self._next_check = time.monotonic() + NEWER_CHECK_SECONDS
                self._tell_newer(state.unknown)
            else:
                self._next_check = time.monotonic() + RECHECK_SECONDS
            return self._problem

    def _tell_newer(self, unknown: frozenset[str]) -> None:
        if unknown and not self._told_newer:
            self._told_newer = True
            log.warning(
                "the database is at revision %s, newer than this release knows; "
                "a newer release migrated it (this one goes on serving)",
                ", ".join(sorted(unknown)),
            )

    async def require(self) -> None:
        """Go on if the schema is right (or unknown yet); else a 503 saying what to do."""
        if self.ok:
            if time.monotonic() >= self._next_check:
                await self.problem()  # a look now and then: migrated under us?
            return
        problem = await self.problem()
        if problem is not None:
            raise ServiceUnavailable(
                problem, code="database_not_migrated", headers={"retry-after": "5"}
            )
