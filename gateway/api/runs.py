"""``/api/v1/runs``: following runs (one, a page, a stream) and acting on them."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from db.models import RunStatus
from db.types import isoformat, to_utc
from gateway.api import views
from gateway.api.bodies import json_object
from gateway.api.routing import (
    PAGE,
    PAGE_SIZE,
    ApiRoute,
    Operation,
    Param,
    id_cursor,
    invalid_cursor,
    limit_problem,
    page_limit,
    recheck,
)
from gateway.api.views import RunLogPage, RunPage, RunView, shaped
from gateway.errors import APIError, ValidationFailed
from gateway.runlogs.logs import logs_since
from gateway.runs.read import RunQuery, transitions_since
from gateway.runs.requests import MetadataUpdate, ReplayRequest, RescheduleRequest, TagsAdd
from gateway.services import services_of

__all__ = ["routes"]

MAX_WAIT_SECONDS = 60
_KEEPALIVE_SECONDS = 15.0


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


async def get_run(request: Request, project_id: str | None) -> Response:
    services = services_of(request)
    run_id = request.path_params["run_id"]
    wait = _wait_seconds(request)
    if wait:
        run = await services.runs.wait(project_id, run_id, wait)
    else:
        run = await services.runs.get(project_id, run_id)
    return shaped(RunView, run)


def _log_page(request: Request) -> tuple[int, int | None]:
    """``limit`` (up to 1000 lines) and a numeric ``cursor`` from the query."""
    raw_cursor = request.query_params.get("cursor") or None
    if raw_cursor is not None and not (
        raw_cursor.isascii() and raw_cursor.isdigit() and len(raw_cursor) <= 18
    ):
        raise invalid_cursor(raw_cursor)
    return page_limit(request, most=1000), int(raw_cursor) if raw_cursor is not None else None


async def run_logs(request: Request, project_id: str | None) -> Response:
    """The lines the run's task logged, oldest first."""
    services = services_of(request)
    limit, cursor = _log_page(request)
    page = await services.runs.logs(project_id, request.path_params["run_id"], limit, cursor)
    return shaped(RunLogPage, page)


async def run_events(request: Request, project_id: str | None) -> Response:
    """Server-Sent Events: one ``status`` event per status change, read from
    the run's transition log (so a change between two wake-ups is never
    skipped), and one ``log`` event per line its task logs; the stream closes
    after the final status (whose lines came before it)."""
    services = services_of(request)
    run_id = request.path_params["run_id"]
    await services.runs.get(project_id, run_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last = 0
        last_line = 0
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        with services.notifier.watch(run_id) as watch:
            changed = watch.changed
            while True:
                changed.clear()
                for line in await services.db.read(logs_since, run_id, last_line):
                    last_line = line["id"]
                    yield f"event: log\ndata: {json.dumps(line)}\n\n"
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
                    if not status.is_final:
                        # A status replayed from the log: the run's end (its
                        # output, its error) belongs to its final event only.
                        data.update(output=None, error=None, finished_at=None)
                    if status.is_final:
                        # Lines that committed after the read above came
                        # before this final status: they go first.
                        for line in await services.db.read(logs_since, run_id, last_line):
                            last_line = line["id"]
                            yield f"event: log\ndata: {json.dumps(line)}\n\n"
                    yield f"id: {last}\nevent: status\ndata: {json.dumps(data)}\n\n"
                    if status.is_final:
                        return
                try:
                    await asyncio.wait_for(changed.wait(), timeout=services.auth.ttl)
                except TimeoutError:
                    pass
                # The credential is checked again as the stream goes on: a
                # key revoked (or a token expired) since ends it.
                try:
                    await recheck(request)
                except APIError as exc:
                    yield f"event: error\ndata: {json.dumps(exc.body())}\n\n"
                    return
                if changed.is_set():
                    quiet_since = loop.time()
                elif loop.time() - quiet_since >= _KEEPALIVE_SECONDS:
                    if await request.is_disconnected():
                        return
                    yield ": keep-alive\n\n"
                    quiet_since = loop.time()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def cancel_run(request: Request, project_id: str) -> Response:
    services = services_of(request)
    return shaped(RunView, await services.runs.cancel(project_id, request.path_params["run_id"]))


async def replay_run(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, ReplayRequest)
    run = await services.runs.replay(project_id, request.path_params["run_id"], body.from_node)
    run["public_access_token"] = services.tokens.issue(run["id"])
    return shaped(RunView, run, status_code=202, headers={"location": f"/api/v1/runs/{run['id']}"})


async def reschedule_run(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, RescheduleRequest)
    return shaped(
        RunView,
        await services.runs.reschedule(project_id, request.path_params["run_id"], body.delay),
    )


async def add_run_tags(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, TagsAdd)
    tags = await services.runs.add_tags(project_id, request.path_params["run_id"], body.tags)
    return shaped(views.RunTags, {"tags": tags})


async def update_run_metadata(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, MetadataUpdate)
    metadata = await services.runs.update_metadata(
        project_id, request.path_params["run_id"], body.metadata, body.operations
    )
    return shaped(views.RunMetadata, {"metadata": metadata})


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


async def list_runs(request: Request, project_id: str) -> Response:
    services = services_of(request)
    statuses = tuple(s.upper() for s in _list_param(request, "status"))
    unknown = [s for s in statuses if s not in RunStatus.__members__]
    details = [
        {"path": "query.status", "type": "enum", "message": f"unknown status {s!r}"}
        for s in unknown
    ]
    problem = limit_problem(request)
    if problem is not None:
        details.append(problem)
    if details:
        raise ValidationFailed(details=details)
    query = RunQuery(
        statuses=statuses,
        tasks=_list_param(request, "task"),
        tag=request.query_params.get("tag") or None,
        queue=request.query_params.get("queue") or None,
        created_after=_time_param(request, "created_after"),
        created_before=_time_param(request, "created_before"),
        limit=page_limit(request),
        cursor=id_cursor(request, "run"),
    )
    return shaped(RunPage, await services.runs.find(project_id, query))


RUN_ID = Param("run_id", "path", "a run's ID (run_…)", required=True)
TOKEN = Param("token", "query", "a run's public_access_token, instead of a bearer key")
SSE = (
    "text/event-stream: one `status` event per status change and one `log` event per "
    "line the task logs, closing after the final status"
)

routes = [
    ApiRoute(
        "GET",
        "/api/v1/runs",
        list_runs,
        Operation(
            "List runs, newest first",
            "runs",
            {200: views.RunPage},
            params=(
                Param("status", "query", "one or more statuses, comma-separated"),
                Param("task", "query", "one or more tasks, comma-separated"),
                Param("tag", "query", "runs with this tag"),
                Param("queue", "query", "runs in this queue"),
                Param("created_after", "query", "ISO-8601"),
                Param("created_before", "query", "ISO-8601"),
                *PAGE,
            ),
            errors=(422,),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/runs/{run_id}",
        get_run,
        Operation(
            "Get a run (long-poll with ?wait=)",
            "runs",
            {200: views.RunView},
            auth="key_or_token",
            params=(
                RUN_ID,
                Param(
                    "wait",
                    "query",
                    "seconds to wait for a final status (<= 60)",
                    {"type": "number"},
                ),
                TOKEN,
            ),
            errors=(404, 422),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/runs/{run_id}/events",
        run_events,
        Operation(
            "Follow a run (Server-Sent Events)",
            "runs",
            {200: SSE},
            auth="key_or_token",
            params=(RUN_ID, TOKEN),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/runs/{run_id}/logs",
        run_logs,
        Operation(
            "The lines the run's task logged (ctx.logger), oldest first",
            "runs",
            {200: views.RunLogPage},
            auth="key_or_token",
            params=(
                RUN_ID,
                Param("limit", "query", f"1 to 1000 ({PAGE_SIZE})", {"type": "integer"}),
                Param("cursor", "query", "next_cursor of the previous page"),
                TOKEN,
            ),
            errors=(404, 422),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/runs/{run_id}/cancel",
        cancel_run,
        Operation(
            "Cancel a run (and a workflow's children)",
            "runs",
            {200: views.RunView},
            params=(RUN_ID,),
            errors=(404, 409),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/runs/{run_id}/replay",
        replay_run,
        Operation(
            "Run the same task and payload again (a workflow: from one of its nodes)",
            "runs",
            {202: views.RunView},
            ReplayRequest,
            params=(RUN_ID,),
            errors=(400, 404, 413, 422),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/runs/{run_id}/reschedule",
        reschedule_run,
        Operation(
            "Move a DELAYED run",
            "runs",
            {200: views.RunView},
            RescheduleRequest,
            params=(RUN_ID,),
            errors=(404, 409, 422),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/runs/{run_id}/tags",
        add_run_tags,
        Operation(
            "Add tags to a run (at most 10 in all)",
            "runs",
            {200: views.RunTags},
            TagsAdd,
            params=(RUN_ID,),
            errors=(404, 422),
        ),
    ),
    ApiRoute(
        "PUT",
        "/api/v1/runs/{run_id}/metadata",
        update_run_metadata,
        Operation(
            "Replace a run's metadata and change it by operations (set, delete, append, "
            "remove, increment, update)",
            "runs",
            {200: views.RunMetadata},
            MetadataUpdate,
            params=(RUN_ID,),
            errors=(404, 422),
        ),
    ),
]
