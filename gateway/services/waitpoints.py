"""The waitpoints service: what runs wait for outside them (``gateway.waitpoints.waitpoints``)."""

from __future__ import annotations

from typing import Any

from db.types import utcnow
from gateway.auth.tokens import WaitpointTokens
from gateway.runs.requests import WaitpointCreate
from gateway.services.units import UnitRunner
from gateway.waitpoints.waitpoints import (
    complete_waitpoint,
    create_run_waitpoint,
    create_waitpoint,
    due_waitpoints,
    list_waitpoints,
    load_waitpoint,
)

__all__ = ["WaitpointService"]


class WaitpointService:
    """Waitpoints made, read and completed through the API."""

    def __init__(self, units: UnitRunner, *, tokens: WaitpointTokens) -> None:
        #: What runs this service's units of work and their effects.
        self.units = units
        self.db = units.db
        self.settings = units.settings
        #: Sign and read the part of a waitpoint's URL that completes it.
        self.tokens = tokens

    def _with_url(self, view: dict[str, Any]) -> dict[str, Any]:
        """A waitpoint's view with its signed URL (while it waits)."""
        view["url"] = self.tokens.url_of(view["id"]) if view["status"] == "WAITING" else None
        return view

    async def create_waitpoint(
        self, project_id: str, body: WaitpointCreate
    ) -> tuple[dict[str, Any], bool]:
        """A waitpoint (or the one its idempotency key made), with its URL."""
        view, cached = await self.db.write(
            create_waitpoint, project_id, body.timeout, body.idempotency_key, body.tags, utcnow()
        )
        return self._with_url(view), cached

    async def create_run_waitpoint(
        self,
        run_id: str,
        key: str,
        timeout: float | None,  # noqa: ASYNC109 (the waitpoint's, not this call's)
        tags: list[str],
    ) -> dict[str, Any]:
        """A durable task's waitpoint (``ctx.create_waitpoint``), with its URL."""
        view = await self.db.write(create_run_waitpoint, run_id, key, timeout, tags, utcnow())
        return self._with_url(view)

    async def list_waitpoints(
        self,
        project_id: str,
        *,
        limit: int,
        cursor: str | None = None,
        statuses: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """A page of the project's waitpoints, newest first, with their URLs."""
        page = await self.db.read(list_waitpoints, project_id, limit, cursor, statuses)
        page["data"] = [self._with_url(view) for view in page["data"]]
        return page

    async def waitpoint(self, project_id: str, waitpoint_id: str) -> dict[str, Any]:
        return self._with_url(await self.db.read(load_waitpoint, project_id, waitpoint_id))

    async def complete_waitpoint(
        self, project_id: str | None, waitpoint_id: str, output: Any
    ) -> dict[str, Any]:
        """Complete a waitpoint (``project_id=None``: through its URL); the
        workflow waiting on it goes on."""
        view, effects = await self.units.write_until_settled(
            complete_waitpoint, project_id, waitpoint_id, output, utcnow()
        )
        await self.units.after(effects)
        return self._with_url(view)

    async def complete_waitpoint_by_url(self, token: str, output: Any) -> dict[str, Any]:
        return await self.complete_waitpoint(None, self.tokens.waitpoint_of(token), output)

    async def end_due_waitpoints(self) -> int:
        """One scheduler pass over waitpoints: delays due complete, waits past
        their timeout end TIMED_OUT."""
        ended = await self.units.write(due_waitpoints, utcnow())
        await self.units.after(ended)
        return len(ended.changed)
