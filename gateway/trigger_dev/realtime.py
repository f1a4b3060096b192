"""``runs.subscribeToRun`` (and React's ``useRealtimeRun``): a run as a shape.

The SDK reads ``/realtime/v1/runs/{id}`` with Electric's shape client
(``@electric-sql/client``): a first request (``offset=-1``) gets the run as an
``insert`` and an ``up-to-date`` control message, with ``electric-handle``,
``electric-offset`` and ``electric-schema``; then ``live=true`` long-polls
from that offset each get the run again as an ``update`` when it changed, or
only ``up-to-date`` when nothing did within the poll (with
``electric-cursor``). The offset is the run's last transition in its log, and
the wait is on the same notifications as the gateway's own long-polls and
event streams, so no status change is skipped. The SDK stops once the run
has ``completedAt``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.routing import recheck, run_reader
from gateway.api.views import JSON
from gateway.errors import BadRequest
from gateway.runs.read import transitions_since
from gateway.services import services_of

__all__ = ["raw_row", "routes"]

#: How long a live request waits for a change before it answers "up to date".
LIVE_SECONDS = 20.0

#: The gateway's statuses as the raw statuses the SDK maps to its own.
_RAW_STATUS = {
    "DELAYED": "DELAYED",
    "QUEUED": "PENDING",
    "RETRYING": "PENDING",
    "EXECUTING": "EXECUTING",
    "WAITING": "WAITING_TO_RESUME",
    "COMPLETED": "COMPLETED_SUCCESSFULLY",
    "FAILED": "COMPLETED_WITH_ERRORS",
    "CANCELED": "CANCELED",
    "EXPIRED": "EXPIRED",
    "TIMED_OUT": "TIMED_OUT",
}

#: Every column is sent as its JSON value, so the shape's schema names none
#: to parse; the SDK's zod schema reads them as they are.
_SCHEMA = "{}"


def _raw_time(value: str | None) -> str | None:
    """An ISO time as the shape's columns hold one: UTC, no zone suffix."""
    if not value:
        return None
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(dt.UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds")


def raw_row(run: dict[str, Any]) -> dict[str, Any]:
    """The run as a row of ``SubscribeRunRawShape``."""
    error = run.get("error")
    return {
        "id": run["id"],
        "friendlyId": run["id"],
        "taskIdentifier": run["task"],
        "status": _RAW_STATUS[run["status"]],
        "createdAt": _raw_time(run["created_at"]),
        "updatedAt": _raw_time(run["updated_at"]),
        "startedAt": _raw_time(run.get("started_at")),
        "completedAt": _raw_time(run.get("finished_at")) if run.get("is_final") else None,
        "number": run.get("attempt") or 0,
        "isTest": False,
        "usageDurationMs": run.get("duration_ms") or 0,
        "costInCents": 0,
        "baseCostInCents": 0,
        "payload": orjson.dumps(run.get("payload")).decode(),
        "payloadType": "application/json",
        "metadata": orjson.dumps(run.get("metadata") or {}).decode(),
        "metadataType": "application/json",
        "output": (
            orjson.dumps(run.get("output")).decode() if run["status"] == "COMPLETED" else None
        ),
        "outputType": "application/json" if run["status"] == "COMPLETED" else None,
        "runTags": sorted(run.get("tags") or []),
        "error": (
            {
                "type": "BUILT_IN_ERROR",
                "name": error["code"],
                "message": error["message"] or error["code"],
                "stackTrace": "",
            }
            if error
            else None
        ),
        "realtimeStreams": [],
    }


def _offset(raw: str) -> int:
    """A request's ``offset``: ``-1`` for the start, else ``<transition>_0``."""
    if raw == "-1":
        return -1
    head, _, tail = raw.partition("_")
    if not (head.isdigit() and tail.isdigit() and len(head) <= 18):
        raise BadRequest(
            "offset is not one this shape gave",
            code="invalid_offset",
            details=[{"path": "query.offset", "type": "invalid_offset", "message": raw[:40]}],
        )
    return int(head)


def _answer(messages: list[dict[str, Any]], position: int, run_id: str, *, live: bool) -> Response:
    headers = {
        "electric-handle": run_id,
        "electric-offset": f"{position}_0",
        "cache-control": "no-store",
    }
    if live:
        headers["electric-cursor"] = str(int(time.time()))
    else:
        headers["electric-schema"] = _SCHEMA
    if messages:
        headers["electric-up-to-date"] = ""
    return JSON([*messages, {"headers": {"control": "up-to-date"}}], headers=headers)


async def subscribe_run(request: Request) -> Response:
    services = services_of(request)
    await services.schema.require()
    project_id = await run_reader(request)
    run_id = request.path_params["run_id"]
    seen = _offset(request.query_params.get("offset") or "-1")
    live = request.query_params.get("live") == "true" and seen >= 0

    async def position() -> int:
        steps = await services.db.read(transitions_since, run_id, max(seen, 0))
        return int(steps[-1]["id"]) if steps else max(seen, 0)

    if not live:
        # The offset first, then the row (404 for another project's run): a
        # change between the two reads is sent again on the next poll, never
        # skipped.
        at = await position()
        run = await services.runs.get(project_id, run_id)
        change = {"key": run_id, "value": raw_row(run), "headers": {"operation": "insert"}}
        return _answer([change], at, run_id, live=False)
    await services.runs.get(project_id, run_id)  # 404 for another project's run
    with services.notifier.watch(run_id) as watch:
        at = await position()
        if at <= seen:
            try:
                await asyncio.wait_for(watch.changed.wait(), timeout=LIVE_SECONDS)
            except TimeoutError:
                pass
            await recheck(request)  # a key revoked (a token expired) meanwhile ends it
            at = await position()
    if at <= seen:
        return _answer([], seen, run_id, live=True)
    run = await services.runs.get(project_id, run_id)
    change = {"key": run_id, "value": raw_row(run), "headers": {"operation": "update"}}
    return _answer([change], at, run_id, live=True)


routes = [Route("/realtime/v1/runs/{run_id}", subscribe_run, methods=["GET"])]
