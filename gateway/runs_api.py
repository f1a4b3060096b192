"""Routes for triggering runs and following them: one, a batch, a list, a stream."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from db.ids import new_id
from db.models import RunStatus
from db.types import isoformat, to_utc
from gateway.bodies import json_object
from gateway.errors import NotFound, ValidationFailed
from gateway.runs.read import RunQuery, transitions_since
from gateway.schemas import BatchRequest, RescheduleRequest, TriggerRequest
from gateway.services import Services
from gateway.tokens import PublicTokens
from gateway.views import BatchCreated, BatchSummary, RunPage, RunView, shaped
from jobs.tasks.registry import TaskDefinition

__all__ = ["routes"]

MAX_WAIT_SECONDS = 60
_KEEPALIVE_SECONDS = 15.0


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _definition(services: Services, task: str, path: str = "") -> TaskDefinition:
    definition = services.registry.get(task)
    if definition is None:
        known = ", ".join(services.registry.names())
        raise NotFound(
            f"no task named {task!r}; known tasks: {known}",
            code="task_not_found",
            details=[{"path": path, "message": f"no task {task!r}", "type": "task_not_found"}]
            if path
            else (),
        )
    return definition


async def trigger(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    task = request.path_params["task"]
    definition = _definition(services, task)
    body = await json_object(request, services.settings.max_body_bytes, TriggerRequest)
    details = definition.payload_errors(body.payload, "payload")
    if details:
        raise ValidationFailed(
            f"the payload does not fit task {task!r}", code="invalid_payload", details=details
        )
    header_key = request.headers.get("idempotency-key")
    if header_key and not body.options.idempotency_key:
        if len(header_key) > 200:
            raise ValidationFailed(
                details=[
                    {
                        "path": "header.idempotency-key",
                        "message": "at most 200 characters",
                        "type": "string_too_long",
                    }
                ]
            )
        body.options.idempotency_key = header_key
    run, cached = await services.runs.trigger(principal.project_id, task, body)
    return shaped(
        RunView,
        run,
        status_code=200 if cached else 202,
        headers={"location": f"/api/v1/runs/{run['id']}"},
    )


async def batch_trigger(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    body = await json_object(request, services.settings.max_body_bytes, BatchRequest)
    details: list[dict[str, Any]] = []
    for i, item in enumerate(body.items):
        definition = services.registry.get(item.task)
        if definition is None:
            details.append(
                {
                    "path": f"items.{i}.task",
                    "message": f"no task {item.task!r}",
                    "type": "task_not_found",
                }
            )
            continue
        details.extend(definition.payload_errors(item.payload, f"items.{i}.payload"))
    if details:
        raise ValidationFailed(
            "some items do not fit their task", code="invalid_payload", details=details
        )
    new = [
        services.runs.new_row(
            principal.project_id, item.task, item.payload, item.options, field=f"items.{i}.options"
        )
        for i, item in enumerate(body.items)
    ]
    batch_id = new_id("batch")
    created = await services.runs.create(new, batch_id=batch_id)
    return shaped(
        BatchCreated,
        {"batch_id": batch_id, "runs": [view for view, _ in created]},
        status_code=202,
        headers={"location": f"/api/v1/batches/{batch_id}"},
    )


def _wait_seconds(request: Request) -> float | None:
    raw = request.query_params.get("wait")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise ValidationFailed(
            f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS}",
            details=[{"path": "query.wait", "message": f"got {raw!r}", "type": "value_error"}],
        )
    return value


async def _reader(request: Request, services: Services, run_id: str) -> str | None:
    """Who may read ``run_id``: the project of an API key, or ``None`` for a
    public access token made for exactly this run."""
    token = request.query_params.get("token")
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if not token and scheme.lower() == "bearer" and PublicTokens.looks_like(value.strip()):
        token = value.strip()
    if token:
        if services.runs.tokens.run_of(token) != run_id:
            raise NotFound(f"no run with id {run_id!r}", code="run_not_found")
        return None
    return (await services.auth.authenticate(request)).project_id


async def get_run(request: Request) -> Response:
    services = _services(request)
    run_id = request.path_params["run_id"]
    project_id = await _reader(request, services, run_id)
    wait = _wait_seconds(request)
    if wait:
        run = await services.runs.wait(project_id, run_id, wait)
    else:
        run = await services.runs.get(project_id, run_id)
    return shaped(RunView, run)


async def run_events(request: Request) -> Response:
    """Server-Sent Events: one per status change, read from the run's
    transition log (so a change between two wake-ups is never skipped); the
    stream closes after the final one."""
    services = _services(request)
    run_id = request.path_params["run_id"]
    project_id = await _reader(request, services, run_id)
    await services.runs.get(project_id, run_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last = 0
        with services.notifier.watch(run_id) as changed:
            while True:
                changed.clear()
                steps = await services.db.read(transitions_since, run_id, last)
                view = await services.runs.get(project_id, run_id) if steps else None
                for step in steps:
                    last = step["id"]
                    status = RunStatus(step["to_status"])
                    data = {
                        **(view or {}),
                        "status": status.value,
                        "is_final": status.is_final,
                        "transition": {
                            "from": step["from_status"],
                            "to": status.value,
                            "attempt": step["attempt"],
                            "at": isoformat(step["at"]),
                        },
                    }
                    yield f"id: {last}\nevent: status\ndata: {json.dumps(data)}\n\n"
                    if status.is_final:
                        return
                try:
                    await asyncio.wait_for(changed.wait(), timeout=_KEEPALIVE_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield ": keep-alive\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def cancel_run(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    return shaped(
        RunView, await services.runs.cancel(principal.project_id, request.path_params["run_id"])
    )


async def replay_run(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    run = await services.runs.replay(principal.project_id, request.path_params["run_id"])
    return shaped(RunView, run, status_code=202, headers={"location": f"/api/v1/runs/{run['id']}"})


async def reschedule_run(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    body = await json_object(request, services.settings.max_body_bytes, RescheduleRequest)
    return shaped(
        RunView,
        await services.runs.reschedule(
            principal.project_id, request.path_params["run_id"], body.delay
        ),
    )


def _time_param(request: Request, name: str) -> dt.datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        return to_utc(dt.datetime.fromisoformat(raw.replace("Z", "+00:00")))
    except ValueError as exc:
        raise ValidationFailed(
            details=[
                {
                    "path": f"query.{name}",
                    "type": "datetime_parsing",
                    "message": f"not an ISO-8601 time in range: {raw!r} ({exc})",
                }
            ]
        ) from None


def _list_param(request: Request, name: str) -> tuple[str, ...]:
    return tuple(v for raw in request.query_params.getlist(name) for v in raw.split(",") if v)


async def list_runs(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    statuses = tuple(s.upper() for s in _list_param(request, "status"))
    unknown = [s for s in statuses if s not in RunStatus.__members__]
    raw_limit = request.query_params.get("limit", "25")
    details = [
        {"path": "query.status", "type": "enum", "message": f"unknown status {s!r}"}
        for s in unknown
    ]
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 100:
        details.append(
            {
                "path": "query.limit",
                "type": "value_error",
                "message": "a whole number from 1 to 100",
            }
        )
    if details:
        raise ValidationFailed(details=details)
    query = RunQuery(
        statuses=statuses,
        tasks=_list_param(request, "task"),
        tag=request.query_params.get("tag") or None,
        created_after=_time_param(request, "created_after"),
        created_before=_time_param(request, "created_before"),
        limit=int(raw_limit),
        cursor=request.query_params.get("cursor") or None,
    )
    return shaped(RunPage, await services.runs.find(principal.project_id, query))


async def get_batch(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    return shaped(
        BatchSummary,
        await services.runs.batch(principal.project_id, request.path_params["batch_id"]),
    )


routes = [
    Route("/api/v1/tasks/batch", batch_trigger, methods=["POST"]),
    Route("/api/v1/tasks/{task}/trigger", trigger, methods=["POST"]),
    Route("/api/v1/runs", list_runs, methods=["GET"]),
    Route("/api/v1/runs/{run_id}", get_run, methods=["GET"]),
    Route("/api/v1/runs/{run_id}/events", run_events, methods=["GET"]),
    Route("/api/v1/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
    Route("/api/v1/runs/{run_id}/replay", replay_run, methods=["POST"]),
    Route("/api/v1/runs/{run_id}/reschedule", reschedule_run, methods=["POST"]),
    Route("/api/v1/batches/{batch_id}", get_batch, methods=["GET"]),
]
