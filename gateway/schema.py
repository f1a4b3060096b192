"""Is the database at the schema this code needs? (docs/architecture.md, "Deploying")

``gateway web`` refuses to start on a database it can see is behind. One it
cannot reach at start is checked when it first answers: until a check passes,
``/readyz`` and every API call answer 503 with what to do, never a 500 per
request for a table that is not there. A passed check is kept; a failed one is
tried again every few seconds, so running ``gateway migrate`` is enough.
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


class SchemaGate:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.ok = False
        self._problem: str | None = None
        self._next_check = 0.0
        self._lock = asyncio.Lock()

    async def problem(self) -> str | None:
        """What keeps this gateway from serving, or ``None``; a database that
        does not answer is no problem of the schema (its calls say so)."""
        if self.ok or time.monotonic() < self._next_check:
            return self._problem
        async with self._lock:
            if self.ok or time.monotonic() < self._next_check:
                return self._problem
            try:
                state = await schema_state(self.db)
            except Exception as exc:  # not answering: a later call checks again
                log.debug("could not check the database schema: %s", exc)
                return None
            self._problem = state.problem()
            if self._problem is None:
                self.ok = True
                if state.unknown:
                    log.warning(
                        "the database is at revision %s, newer than this release knows; "
                        "a newer release migrated it",
                        ", ".join(sorted(state.unknown)),
                    )
            else:
                self._next_check = time.monotonic() + RECHECK_SECONDS
            return self._problem

    async def require(self) -> None:
        """Go on if the schema is right (or unknown yet); else a 503 saying what to do."""
        if self.ok:
            return
        problem = await self.problem()
        if problem is not None:
            raise ServiceUnavailable(
                problem, code="database_not_migrated", headers={"retry-after": "5"}
            )
