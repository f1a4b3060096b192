"""``schedules.*``: Trigger.dev's imperative schedules are the gateway's.

``deduplicationKey`` and ``externalId`` are kept on the schedule (the same key
changes the schedule that has it); ``active`` is ``enabled``. Each run's
payload is ``{"type": "IMPERATIVE", "scheduleId"?, "externalId", "timezone"}``;
the tick's time is the run's ``scheduled_at``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.bodies import validate
from gateway.api.tasks import check_task_payload
from gateway.api.views import JSON
from gateway.errors import ValidationFailed
from gateway.runs.requests import ScheduleCreate, ScheduleUpdate
from gateway.services import services_of
from gateway.trigger_dev.common import json_body, offset_page, project_of

__all__ = ["routes", "schedule_object"]


def schedule_object(schedule: dict[str, Any], project_id: str) -> dict[str, Any]:
    """``ScheduleObject`` of a schedule view."""
    found: dict[str, Any] = {
        "id": schedule["id"],
        "type": "IMPERATIVE",
        "task": schedule["task"],
        "active": schedule["enabled"],
        "deduplicationKey": schedule.get("deduplication_key"),
        "externalId": schedule.get("external_id"),
        "generator": {
            "type": "CRON",
            "expression": schedule["cron"],
            "description": schedule["cron"],
        },
        "timezone": schedule["timezone"],
        "nextRun": schedule.get("next_run_at"),
        "environments": [{"id": project_id, "type": "PRODUCTION"}],
    }
    return found


def _payload(external_id: Any, timezone: str) -> dict[str, Any]:
    return {"type": "IMPERATIVE", "externalId": external_id, "timezone": timezone}


async def create_schedule(request: Request) -> Response:
    project_id = await project_of(request)
    services = services_of(request)
    body = await json_body(request)
    timezone = body.get("timezone") or "UTC"
    created = validate(
        ScheduleCreate,
        {
            "task": body.get("task"),
            "cron": body.get("cron"),
            "timezone": timezone,
            "payload": _payload(body.get("externalId"), timezone),
            "external_id": body.get("externalId"),
            "deduplication_key": body.get("deduplicationKey"),
        },
    )
    check_task_payload(services, created.task, created.payload)
    schedule = await services.schedules.create_schedule(project_id, created)
    return JSON(schedule_object(schedule, project_id))


async def list_schedules(request: Request) -> Response:
    """Offset pages: ``{data, pagination: {currentPage, totalPages, count}}``."""
    project_id = await project_of(request)
    services = services_of(request)
    every = await services.schedules.schedules(project_id)
    return offset_page(request, every, lambda schedule: schedule_object(schedule, project_id))


async def retrieve_schedule(request: Request) -> Response:
    project_id = await project_of(request)
    schedule = await services_of(request).schedules.schedule(
        project_id, request.path_params["schedule_id"]
    )
    return JSON(schedule_object(schedule, project_id))


async def update_schedule(request: Request) -> Response:
    """``schedules.update``: the task, cron, time zone and external ID."""
    project_id = await project_of(request)
    services = services_of(request)
    schedule_id = request.path_params["schedule_id"]
    current = await services.schedules.schedule(project_id, schedule_id)
    body = await json_body(request)
    task = body.get("task") or current["task"]
    if task != current["task"]:
        raise ValidationFailed(
            "a schedule's task does not change here: make another schedule",
            details=[{"path": "task", "type": "immutable", "message": f"is {current['task']!r}"}],
        )
    timezone = body.get("timezone") or current["timezone"]
    external_id = body.get("externalId", current.get("external_id"))
    changes = validate(
        ScheduleUpdate,
        {
            "cron": body.get("cron") or current["cron"],
            "timezone": timezone,
            "payload": _payload(external_id, timezone),
            **({"external_id": external_id} if external_id else {}),
        },
    )
    schedule = await services.schedules.update_schedule(project_id, schedule_id, changes)
    return JSON(schedule_object(schedule, project_id))


async def _set_active(request: Request, active: bool) -> Response:
    project_id = await project_of(request)
    schedule = await services_of(request).schedules.update_schedule(
        project_id, request.path_params["schedule_id"], ScheduleUpdate(enabled=active)
    )
    return JSON(schedule_object(schedule, project_id))


async def activate(request: Request) -> Response:
    return await _set_active(request, True)


async def deactivate(request: Request) -> Response:
    return await _set_active(request, False)


async def delete_schedule(request: Request) -> Response:
    project_id = await project_of(request)
    schedule_id = request.path_params["schedule_id"]
    await services_of(request).schedules.delete_schedule(project_id, schedule_id)
    return JSON({"id": schedule_id})


routes = [
    Route("/api/v1/schedules", create_schedule, methods=["POST"]),
    Route("/api/v1/schedules", list_schedules, methods=["GET"]),
    Route("/api/v1/schedules/{schedule_id}", retrieve_schedule, methods=["GET"]),
    Route("/api/v1/schedules/{schedule_id}", update_schedule, methods=["PUT"]),
    Route("/api/v1/schedules/{schedule_id}", delete_schedule, methods=["DELETE"]),
    Route("/api/v1/schedules/{schedule_id}/activate", activate, methods=["POST"]),
    Route("/api/v1/schedules/{schedule_id}/deactivate", deactivate, methods=["POST"]),
]
