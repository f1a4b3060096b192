"""The schedules service: a task's runs on a cron clock (``gateway.schedules.schedules``)."""

from __future__ import annotations

from typing import Any

from db.types import utcnow
from gateway.runs.requests import ScheduleCreate, ScheduleUpdate
from gateway.schedules.schedules import (
    check_schedule,
    create_schedule,
    delete_schedule,
    fire_due,
    get_schedule,
    list_schedules,
    update_schedule,
)
from gateway.services.units import UnitRunner
from webhooks.service import WebhookService

__all__ = ["ScheduleService"]


class ScheduleService:
    """Schedules: their rows, and the runs their ticks make."""

    def __init__(self, units: UnitRunner, *, webhooks: WebhookService) -> None:
        #: What runs this service's units of work and their effects.
        self.units = units
        self.db = units.db
        self.settings = units.settings
        self.webhooks = webhooks

    async def create_schedule(self, project_id: str, body: ScheduleCreate) -> dict[str, Any]:
        """A schedule (its task and payload checked by the caller)."""
        check_schedule(body.cron, body.timezone, body.options)
        if body.options.callback_url is not None:
            body.options.callback_url = self.webhooks.check_url(
                body.options.callback_url, "options.callback_url"
            )
        return await self.units.write_until_settled(
            create_schedule,
            project_id,
            body.task,
            body.cron,
            body.timezone,
            body.payload,
            body.options,
            body.enabled,
            utcnow(),
            body.external_id,
            body.deduplication_key,
        )

    async def schedules(self, project_id: str) -> list[dict[str, Any]]:
        return await self.db.read(list_schedules, project_id)

    async def schedule(self, project_id: str, schedule_id: str) -> dict[str, Any]:
        return await self.db.read(get_schedule, project_id, schedule_id)

    async def update_schedule(
        self, project_id: str, schedule_id: str, body: ScheduleUpdate
    ) -> dict[str, Any]:
        current = await self.schedule(project_id, schedule_id)
        changes = body.changes()
        check_schedule(
            changes.get("cron", current["cron"]),
            changes.get("timezone", current["timezone"]),
            body.options,
        )
        if body.options is not None and body.options.callback_url is not None:
            body.options.callback_url = self.webhooks.check_url(
                body.options.callback_url, "options.callback_url"
            )
        return await self.db.write(update_schedule, project_id, schedule_id, changes, utcnow())

    async def delete_schedule(self, project_id: str, schedule_id: str) -> None:
        await self.db.write(delete_schedule, project_id, schedule_id)

    async def fire_schedules(self) -> int:
        """One scheduler pass over the schedules: a run for each that is due."""
        fired = await self.units.write(fire_due, utcnow())
        await self.units.after(fired)
        return len(fired.jobs)
