"""The dashboard's pages: sign-in, runs, one run, endpoints, one endpoint."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from db.models import RunStatus
from db.types import utcnow
from gateway.dashboard.queries import (
    endpoint_stats,
    feed_cursor,
    run_artifacts,
    run_history,
    run_replays,
    status_counts,
)
from gateway.dashboard.render import redirect, render, safe_next
from gateway.dashboard.session import PREFIX, Viewer, viewer_of
from gateway.runs.read import RunQuery
from gateway.services import services_of
from jobs.protocol import WORKFLOW_TASK

__all__ = [
    "endpoint_page",
    "endpoints_page",
    "home",
    "login_page",
    "queues_page",
    "run_page",
    "runs_page",
    "schedules_page",
    "trigger_form",
    "trigger_page",
    "workers_page",
]

RUNS_PER_PAGE = 25
#: The window the endpoints page measures success rates over.
STATS_WINDOW = dt.timedelta(hours=24)


async def _common(request: Request, viewer: Viewer, active: str) -> dict[str, Any]:
    """What every page needs; the feed position is read before anything else
    on the page, so the live feed picks up whatever changes after it."""
    return {
        "viewer": viewer,
        "active": active,
        "feed_after": str(await services_of(request).db.read(feed_cursor)),
    }


async def home(request: Request) -> Response:
    return redirect(PREFIX + "/runs")


async def login_page(request: Request) -> Response:
    return render(
        request,
        "login",
        {"next": safe_next(request.query_params.get("next")), "error": None},
    )


def _filters(request: Request) -> tuple[dict[str, str], list[str]]:
    """The runs page's filters as given, and what was wrong with them."""
    params = request.query_params
    chosen = {
        "status": params.get("status", "").upper(),
        "task": params.get("task", ""),
        "tag": params.get("tag", "").strip(),
        "queue": params.get("queue", "").strip(),
    }
    problems = []
    if chosen["status"] and chosen["status"] not in RunStatus.__members__:
        problems.append(f"there is no status {chosen['status']!r}; showing every status")
        chosen["status"] = ""
    return chosen, problems


async def runs_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    services = services_of(request)
    common = await _common(request, viewer, "runs")
    chosen, problems = _filters(request)
    cursor = request.query_params.get("cursor") or None
    query = RunQuery(
        statuses=(chosen["status"],) if chosen["status"] else (),
        tasks=(chosen["task"],) if chosen["task"] else (),
        tag=chosen["tag"] or None,
        queue=chosen["queue"] or None,
        limit=RUNS_PER_PAGE,
        cursor=cursor,
    )
    page = await services.runs.find(viewer.project_id, query)
    counts = await services.db.read(status_counts, viewer.project_id)
    return render(
        request,
        "runs",
        {
            **common,
            "runs": page["data"],
            "next_cursor": page["next_cursor"],
            "cursor": cursor,
            "filters": chosen,
            "problems": problems,
            "counts": counts,
            "total": sum(counts.values()),
            "tasks": services.registry.names(),
            "query": {k: v for k, v in chosen.items() if v},
        },
        live=True,
    )


def workflow_graph(run: dict[str, Any]) -> dict[str, Any] | None:
    """A workflow run's nodes (with their status and child run) and edges, for
    the page's script to lay out and draw."""
    payload = run["payload"]
    if run["task"] != WORKFLOW_TASK or not isinstance(payload, dict):
        return None
    states = run.get("nodes") or {}
    nodes = []
    for node in payload.get("nodes") or []:
        if not isinstance(node, dict) or not isinstance(node.get("id"), str):
            continue
        state = states.get(node["id"], {})
        data = node.get("data")
        data = data if isinstance(data, dict) else {}
        error = state.get("error") or {}
        nodes.append(
            {
                "id": node["id"],
                "type": str(node.get("type") or ""),
                "label": str(data.get("label") or node["id"])[:60],
                "status": state.get("status", "PENDING"),
                "href": f"{PREFIX}/runs/{state['run_id']}" if state.get("run_id") else None,
                "error": error.get("code"),
                # A waiting wait node: the page offers to complete it by hand.
                "waitpoint": (state.get("waitpoint") or {}).get("id")
                if node.get("type") == "wait"
                else None,
            }
        )
    known = {n["id"] for n in nodes}
    edges = [
        {"source": e["source"], "target": e["target"], "handle": e.get("targetHandle")}
        for e in payload.get("edges") or []
        if isinstance(e, dict) and e.get("source") in known and e.get("target") in known
    ]
    return {"nodes": nodes, "edges": edges}


async def run_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    services = services_of(request)
    common = await _common(request, viewer, "runs")
    run_id = request.path_params["run_id"]
    run = await services.runs.get(viewer.project_id, run_id)
    history = await services.db.read(run_history, viewer.project_id, run_id)
    replays = await services.db.read(run_replays, viewer.project_id, run_id)
    deliveries = await services.webhooks.run_deliveries(
        viewer.project_id, run_id, limit=50, cursor=None
    )
    logs = await services.runs.logs(viewer.project_id, run_id, 1000, None)
    store = services_of(request).artifacts
    files = [
        {**row, "src": store.path(row["id"])}
        for row in await services.db.read(run_artifacts, viewer.project_id, run_id)
    ]
    return render(
        request,
        "run",
        {
            **common,
            "run": run,
            "history": history,
            "replays": replays,
            "deliveries": deliveries["data"],
            "artifacts": files,
            "graph": workflow_graph(run),
            "logs": logs["data"],
            "more_logs": logs["next_cursor"] is not None,
            # The run's own event stream (a read-only token for this run):
            # the page follows its log lines as they come.
            "log_stream": None
            if run["is_final"]
            else f"/api/v1/runs/{run_id}/events?token={services.tokens.issue(run_id)}",
        },
        live=True,
    )


async def queues_page(request: Request) -> Response:
    """The project's queues with live counts, their limits, pause and resume."""
    viewer = await viewer_of(request)
    services = services_of(request)
    common = await _common(request, viewer, "queues")
    # Configured queues and those with runs in them, a page of them (a
    # project can name thousands of queues in its triggers).
    page = await services.flow.queues(viewer.project_id, limit=200)
    context = {**common, "queues": page["data"], "more": page["next_cursor"] is not None}
    return render(request, "queues", context, live=True)


async def schedules_page(request: Request) -> Response:
    """The project's schedules with their next and last runs."""
    viewer = await viewer_of(request)
    services = services_of(request)
    common = await _common(request, viewer, "schedules")
    schedules = await services.schedules.schedules(viewer.project_id)
    return render(request, "schedules", {**common, "schedules": schedules}, live=True)


async def endpoints_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    services = services_of(request)
    common = await _common(request, viewer, "endpoints")
    endpoints = await services.webhooks.list_endpoints(viewer.project_id)
    stats = await services.db.read(endpoint_stats, viewer.project_id, utcnow() - STATS_WINDOW)
    for endpoint in endpoints:
        numbers = stats.get(endpoint["id"], {"attempts": 0, "succeeded": 0})
        endpoint["stats"] = {
            **numbers,
            "rate": (
                round(100 * numbers["succeeded"] / numbers["attempts"])
                if numbers["attempts"]
                else None
            ),
        }
    return render(
        request,
        "endpoints",
        {
            **common,
            "endpoints": endpoints,
            "stats_hours": int(STATS_WINDOW.total_seconds() // 3600),
        },
        live=True,
    )


async def endpoint_page(request: Request) -> Response:
    viewer = await viewer_of(request)
    services = services_of(request)
    common = await _common(request, viewer, "endpoints")
    endpoint_id = request.path_params["endpoint_id"]
    endpoint = await services.webhooks.get_endpoint(viewer.project_id, endpoint_id)
    cursor = request.query_params.get("cursor") or None
    page = await services.webhooks.endpoint_deliveries(
        viewer.project_id, endpoint_id, limit=25, cursor=cursor
    )
    return render(
        request,
        "endpoint",
        {
            **common,
            "endpoint": endpoint,
            "deliveries": page["data"],
            "next_cursor": page["next_cursor"],
            "cursor": cursor,
        },
        live=True,
    )


def trigger_form(
    request: Request,
    viewer: Viewer,
    *,
    task: str,
    payload: str,
    tags: str = "",
    delay: str = "",
    errors: list[str] | None = None,
    status_code: int = 200,
) -> Response:
    """The "trigger a run" form, filled in (and what was wrong, after a try)."""
    return render(
        request,
        "trigger",
        {
            "viewer": viewer,
            "active": "runs",
            "tasks": services_of(request).registry.describe(),
            "task": task,
            "payload": payload,
            "tags": tags,
            "delay": delay,
            "errors": errors or [],
        },
        status_code=status_code,
    )


async def trigger_page(request: Request) -> Response:
    """Start a run by hand: any task, or ``?from=<run>`` to start from a run's payload."""
    viewer = await viewer_of(request)
    services = services_of(request)
    task = request.query_params.get("task", "")
    payload: object = {}
    tags = ""
    source = request.query_params.get("from")
    if source:
        run = await services.runs.get(viewer.project_id, source)
        task, payload, tags = run["task"], run["payload"], ", ".join(run["tags"])
    return trigger_form(
        request,
        viewer,
        task=task,
        payload=json.dumps(payload, indent=2, ensure_ascii=False),
        tags=tags,
    )


async def workers_page(request: Request) -> Response:
    """The worker processes: online, lost and lately stopped, their slots and
    the project's runs each holds."""
    viewer = await viewer_of(request)
    services = services_of(request)
    common = await _common(request, viewer, "workers")
    workers = await services.workers.list(viewer.project_id)
    context = {
        **common,
        "workers": workers,
        "heartbeat_timeout": services.settings.heartbeat_timeout,
    }
    return render(request, "workers", context)
