"""Trigger.dev's management API at ``/trigger.dev``, for its SDK unchanged.

``TRIGGER_API_URL=http://<gateway>/trigger.dev`` and ``TRIGGER_SECRET_KEY=<a
gateway API key>`` point ``@trigger.dev/sdk`` here. Each route reads the SDK's
request, calls the same service the gateway's own API calls, and answers in
the shape the SDK's zod schemas parse (``gateway.trigger_dev.wire``).
docs/trigger-dev.md says what maps and what differs.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from db.types import utcnow
from gateway.api.bodies import json_object, validate
from gateway.api.routing import run_reader
from gateway.api.tasks import check_task_payload, traced_trigger
from gateway.api.views import JSON
from gateway.errors import ValidationFailed
from gateway.runs.errors import RunAlreadyFinal
from gateway.runs.read import RunQuery
from gateway.runs.requests import (
    Duration,
    MetadataUpdate,
    RescheduleRequest,
    TagsAdd,
    TriggerRequest,
)
from gateway.services import services_of
from gateway.trigger_dev import wire
from gateway.trigger_dev.batches import routes as batch_routes
from gateway.trigger_dev.common import after_cursor, json_body, project_of
from gateway.trigger_dev.queues import routes as queue_routes
from gateway.trigger_dev.realtime import routes as realtime_routes
from gateway.trigger_dev.schedules import routes as schedule_routes
from gateway.trigger_dev.tokens import routes as token_routes

__all__ = ["trigger_dev_routes"]

#: The prefix the SDK's ``TRIGGER_API_URL`` names.
PREFIX = "/trigger.dev"


async def trigger(request: Request) -> Response:
    """``tasks.trigger``: ``{id, isCached}``, and the run's public access
    token in ``x-trigger-jwt`` (the SDK hands it out as ``publicAccessToken``)."""
    project_id = await project_of(request)
    services = services_of(request)
    task = request.path_params["task"]
    body = validate(TriggerRequest, wire.trigger_request(await json_body(request)))
    check_task_payload(services, task, body.payload)
    run, cached = await traced_trigger(request, project_id, task, body)
    return JSON(
        {"id": run["id"], "isCached": cached},
        headers={"x-trigger-jwt": services.tokens.issue(run["id"])},
    )


async def _retrieved(request: Request, project_id: str | None, run: dict[str, Any]) -> JSON:
    services = services_of(request)
    parent = children = schedule = None
    if run.get("parent_id"):
        parent = await services.runs.get(project_id, run["parent_id"])
    child_ids = [n["run_id"] for n in (run.get("nodes") or {}).values() if n.get("run_id")]
    if child_ids:
        children = [await services.runs.get(project_id, c) for c in dict.fromkeys(child_ids)]
    if run.get("schedule_id") and project_id is not None:
        schedule = await services.schedules.schedule(project_id, run["schedule_id"])
    return JSON(wire.retrieved_run(run, parent=parent, children=children, schedule=schedule))


async def retrieve_run(request: Request) -> Response:
    """``runs.retrieve`` (and ``runs.poll``): a key, or the run's public token."""
    await services_of(request).schema.require()
    project_id = await run_reader(request)
    run = await services_of(request).runs.get(project_id, request.path_params["run_id"])
    return await _retrieved(request, project_id, run)


_STATUS_FILTER = {
    "QUEUED": ("QUEUED", "RETRYING"),
    "DELAYED": ("DELAYED",),
    "EXECUTING": ("EXECUTING",),
    "WAITING": ("WAITING",),
    "COMPLETED": ("COMPLETED",),
    "FAILED": ("FAILED",),
    "CANCELED": ("CANCELED",),
    "EXPIRED": ("EXPIRED",),
    "TIMED_OUT": ("TIMED_OUT",),
}


def _listed(request: Request, name: str) -> tuple[str, ...]:
    raw = request.query_params.get(name) or ""
    return tuple(v for v in raw.split(",") if v)


def _instant(request: Request, name: str) -> dt.datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        if raw.isdigit():  # the SDK sends Dates as milliseconds
            return dt.datetime.fromtimestamp(int(raw) / 1000, dt.UTC)
        return dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise ValidationFailed(
            details=[{"path": f"query.{name}", "type": "datetime", "message": f"got {raw[:40]!r}"}]
        ) from None


class _Period(BaseModel):
    #: ``filter[createdAt][period]``: a duration back from now (``"1d"``).
    period: Duration


async def list_runs(request: Request) -> Response:
    """``runs.list`` with its filters; ``pagination.next`` pages to older runs
    (the SDK's auto-pagination follows it)."""
    project_id = await project_of(request)
    services = services_of(request)
    statuses = _listed(request, "filter[status]")
    wanted = tuple(g for s in statuses if s in _STATUS_FILTER for g in _STATUS_FILTER[s])
    size = request.query_params.get("page[size]") or "25"
    if not (size.isdigit() and 1 <= int(size) <= 100):
        raise ValidationFailed(
            details=[{"path": "query.page[size]", "type": "value_error", "message": "1 to 100"}]
        )
    if statuses and not wanted:  # only statuses no run here has (CRASHED, …)
        return JSON({"data": [], "pagination": {}})
    period = request.query_params.get("filter[createdAt][period]")
    since = _instant(request, "filter[createdAt][from]")
    if period:
        seconds = validate(_Period, {"period": period}).period
        since = max(filter(None, [since, utcnow() - dt.timedelta(seconds=seconds)]))
    query = RunQuery(
        statuses=wanted,
        tasks=_listed(request, "filter[taskIdentifier]"),
        any_tags=_listed(request, "filter[tag]"),
        queues=_listed(request, "filter[queue]"),
        batch_id=request.query_params.get("filter[batch]") or None,
        schedule_id=request.query_params.get("filter[schedule]") or None,
        created_after=since,
        created_before=_instant(request, "filter[createdAt][to]"),
        limit=int(size),
        cursor=after_cursor(request, "run"),
    )
    page = await services.runs.find(project_id, query)
    return JSON(
        {
            "data": [wire.list_item(r, project_id) for r in page["data"]],
            "pagination": {"next": page["next_cursor"]} if page.get("next_cursor") else {},
        }
    )


async def cancel_run(request: Request) -> Response:
    """``runs.cancel``: ``{id}``; a run that is final already stays as it is."""
    project_id = await project_of(request)
    run_id = request.path_params["run_id"]
    try:
        await services_of(request).runs.cancel(project_id, run_id)
    except RunAlreadyFinal:
        pass
    return JSON({"id": run_id})


async def replay_run(request: Request) -> Response:
    """``runs.replay``: the new run's ``{id}``."""
    project_id = await project_of(request)
    run = await services_of(request).runs.replay(project_id, request.path_params["run_id"])
    return JSON({"id": run["id"]})


async def reschedule_run(request: Request) -> Response:
    """``runs.reschedule``: a DELAYED run's new ``delay`` (a duration or a
    time); the run as ``runs.retrieve`` shows it."""
    project_id = await project_of(request)
    body = await json_object(
        request, services_of(request).settings.max_body_bytes, RescheduleRequest
    )
    run = await services_of(request).runs.reschedule(
        project_id, request.path_params["run_id"], body.delay
    )
    return await _retrieved(request, project_id, run)


async def add_tags(request: Request) -> Response:
    """``tags.add`` (a Trigger.dev task's call): ``{message}``."""
    project_id = await project_of(request)
    services = services_of(request)
    tags = (await json_body(request)).get("tags")
    body = validate(TagsAdd, {"tags": [tags] if isinstance(tags, str) else tags})
    await services.runs.add_tags(project_id, request.path_params["run_id"], body.tags)
    return JSON({"message": f"tags added to {request.path_params['run_id']}"})


async def update_metadata(request: Request) -> Response:
    """``metadata.*`` flushed (``FlushedRunMetadata``): ``{metadata}``."""
    project_id = await project_of(request)
    services = services_of(request)
    body = validate(MetadataUpdate, await json_body(request))
    metadata = await services.runs.update_metadata(
        project_id, request.path_params["run_id"], body.metadata, body.operations
    )
    return JSON({"metadata": metadata})


async def get_metadata(request: Request) -> Response:
    project_id = await project_of(request)
    run = await services_of(request).runs.get(project_id, request.path_params["run_id"])
    return JSON({"metadata": run.get("metadata") or {}})


async def reset_idempotency_key(request: Request) -> Response:
    """``idempotencyKeys.reset``: ``{id}`` (the key, as the SDK hashed it)."""
    project_id = await project_of(request)
    services = services_of(request)
    task = (await json_body(request)).get("taskIdentifier")
    if not isinstance(task, str) or not task:
        raise ValidationFailed(
            details=[{"path": "taskIdentifier", "type": "missing", "message": "a task's name"}]
        )
    key = request.path_params["key"]
    await services.runs.reset_idempotency_key(project_id, task, key)
    return JSON({"id": key})


def trigger_dev_routes() -> list[BaseRoute]:
    """The routes under ``/trigger.dev``: outside the gateway's own OpenAPI
    document, as they speak another API's dialect."""
    return [
        Mount(
            PREFIX,
            routes=[
                Route("/api/v1/tasks/{task}/trigger", trigger, methods=["POST"]),
                Route("/api/v3/runs/{run_id}", retrieve_run, methods=["GET"]),
                Route("/api/v1/runs", list_runs, methods=["GET"]),
                Route("/api/v2/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
                Route("/api/v1/runs/{run_id}/replay", replay_run, methods=["POST"]),
                Route("/api/v1/runs/{run_id}/reschedule", reschedule_run, methods=["POST"]),
                Route(
                    "/api/v1/idempotencyKeys/{key}/reset", reset_idempotency_key, methods=["POST"]
                ),
                Route("/api/v1/runs/{run_id}/tags", add_tags, methods=["POST"]),
                Route("/api/v1/runs/{run_id}/metadata", update_metadata, methods=["PUT"]),
                Route("/api/v1/runs/{run_id}/metadata", get_metadata, methods=["GET"]),
                *batch_routes,
                *token_routes,
                *queue_routes,
                *realtime_routes,
                *schedule_routes,
            ],
        )
    ]
