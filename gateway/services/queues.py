"""The flow-control service: queues (limits, pauses) and bulk actions.

The decisions are the units' (``gateway.queues.admission``, ``queues``, ``bulk``);
this service runs them, and drives a bulk action's pages in the background.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from db.types import utcnow
from gateway.queues.admission import any_held, pump_held
from gateway.queues.bulk import bulk_page, create_bulk, load_bulk, unfinished_bulks
from gateway.queues.queues import create_queue, get_queue, list_queues, update_queue
from gateway.runs.effects import Effects
from gateway.services.units import UnitRunner

__all__ = ["FlowService"]

log = logging.getLogger("gateway.queues.admission")


class FlowService:
    """Queues (limits, pauses) and bulk actions."""

    def __init__(self, units: UnitRunner) -> None:
        #: What runs this service's units of work and their effects.
        self.units = units
        self.db = units.db
        self.settings = units.settings
        #: Bulk actions this process is doing, by ID.
        self._bulks: dict[str, asyncio.Task[None]] = {}

    async def queues(
        self, project_id: str, *, limit: int = 1000, after: str | None = None
    ) -> dict[str, Any]:
        """A page of the project's queues (``next_cursor``: the last name)."""
        return await self.db.read(list_queues, project_id, limit, after)

    async def queue(self, project_id: str, name: str) -> dict[str, Any]:
        return await self.db.read(get_queue, project_id, name)

    async def create_queue(
        self, project_id: str, name: str, limit: int | None, paused: bool
    ) -> dict[str, Any]:
        return await self.units.write(create_queue, project_id, name, limit, paused)

    async def update_queue(
        self, project_id: str, name: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change a queue's limit or pause it; a raised limit or a resume
        hands out held runs before this returns."""
        return await self.units.write(update_queue, project_id, name, changes)

    async def pump_queues(self) -> int:
        """Hand out what every queue with held runs has room for (the
        reconciler's pass; each unit that frees a slot does it too)."""
        if not await self.db.read(any_held):
            return 0
        jobs = await self.db.write(pump_held, utcnow())
        if jobs:
            await self.units.enqueue_all(Effects(jobs=jobs))
        return len(jobs)

    async def bulk(self, project_id: str, action: str, selection: dict[str, Any]) -> dict[str, Any]:
        """Record a bulk action and start doing it in pages, here in the background."""
        view = await self.db.write(create_bulk, project_id, action, selection, utcnow())
        if not view["is_final"]:
            self._drive(view["id"])
        return view

    async def bulk_status(self, project_id: str, bulk_id: str) -> dict[str, Any]:
        return await self.db.read(load_bulk, project_id, bulk_id)

    def _drive(self, bulk_id: str) -> None:
        if bulk_id in self._bulks:
            return
        task = asyncio.get_running_loop().create_task(self._drive_bulk(bulk_id))
        self._bulks[bulk_id] = task
        task.add_done_callback(lambda _: self._bulks.pop(bulk_id, None))

    async def _drive_bulk(self, bulk_id: str) -> None:
        try:
            while True:
                page = await self.units.write_until_settled(bulk_page, bulk_id, utcnow())
                await self.units.after(page.effects)
                if page.done:
                    return
        except Exception:  # the reconciler resumes it; the page did nothing twice
            log.exception("bulk action %s stopped; the reconciler resumes it", bulk_id)

    async def resume_bulks(self, grace: float) -> int:
        """Resume bulk actions that stopped moving (their process went away)."""
        stalled = await self.db.read(unfinished_bulks, utcnow() - dt.timedelta(seconds=grace))
        for bulk_id in stalled:
            self._drive(bulk_id)
        return len(stalled)
