"""``queues.*``: Trigger.dev's queues are the gateway's (gateway.queues).

A queue's ``id`` here is its name. ``type`` is ``task`` for a registered
task's own queue and ``custom`` for the rest. Trigger.dev's "override" of a
queue's concurrency limit is the gateway's limit set through the API; a
"reset" puts back the limit the tasks declare (``@task(concurrency_limit=)``),
or none.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.views import JSON
from gateway.errors import ValidationFailed
from gateway.queues.queues import task_queues
from gateway.queues.slots import default_queue
from gateway.services import services_of
from gateway.trigger_dev.common import json_body, offset_page, project_of

__all__ = ["routes"]


def _queue_name(name: str, kind: Any) -> str:
    """The queue a request names: by a task's name (``type: "task"``: that
    task's queue) or by its own (``custom``, ``id``)."""
    return default_queue(name)[0] if kind == "task" else name


def _item(queue: dict[str, Any], declared: dict[str, int | None]) -> dict[str, Any]:
    """``QueueItem`` (its ``V2`` form) of a queue view; ``declared``: the
    tasks' own queues (``gateway.queues.queues.task_queues``)."""
    return {
        "id": queue["name"],
        "name": queue["name"],
        "type": "task" if queue["name"] in declared else "custom",
        "running": queue["running"],
        "queued": queue["queued"],
        "paused": queue["paused"],
        "concurrencyLimit": queue["concurrency_limit"],
        "version": "V2",
    }


async def list_queues(request: Request) -> Response:
    """``{data, pagination: {currentPage, totalPages, count}}`` (offset pages)."""
    project_id = await project_of(request)
    services = services_of(request)
    every = (await services.flow.queues(project_id))["data"]
    declared = task_queues()
    return offset_page(request, every, lambda queue: _item(queue, declared))


async def retrieve_queue(request: Request) -> Response:
    project_id = await project_of(request)
    services = services_of(request)
    name = _queue_name(request.path_params["name"], request.query_params.get("type"))
    queue = await services.flow.queue(project_id, name)
    return JSON(_item(queue, task_queues()))


async def pause_queue(request: Request) -> Response:
    """``action``: ``pause`` or ``resume``."""
    project_id = await project_of(request)
    services = services_of(request)
    body = await json_body(request)
    action = body.get("action")
    if action not in ("pause", "resume"):
        raise ValidationFailed(
            details=[{"path": "action", "type": "enum", "message": "pause or resume"}]
        )
    name = _queue_name(request.path_params["name"], body.get("type"))
    queue = await services.flow.update_queue(project_id, name, {"paused": action == "pause"})
    return JSON(_item(queue, task_queues()))


async def override_limit(request: Request) -> Response:
    project_id = await project_of(request)
    services = services_of(request)
    body = await json_body(request)
    limit = body.get("concurrencyLimit")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100_000:
        raise ValidationFailed(
            details=[{"path": "concurrencyLimit", "type": "value_error", "message": "1 to 100000"}]
        )
    name = _queue_name(request.path_params["name"], body.get("type"))
    queue = await services.flow.update_queue(project_id, name, {"concurrency_limit": limit})
    return JSON(_item(queue, task_queues()))


async def reset_limit(request: Request) -> Response:
    project_id = await project_of(request)
    services = services_of(request)
    body = await json_body(request)
    name = _queue_name(request.path_params["name"], body.get("type"))
    queue = await services.flow.update_queue(
        project_id, name, {"concurrency_limit": task_queues().get(name)}
    )
    return JSON(_item(queue, task_queues()))


routes = [
    Route("/api/v1/queues", list_queues, methods=["GET"]),
    Route("/api/v1/queues/{name}", retrieve_queue, methods=["GET"]),
    Route("/api/v1/queues/{name}/pause", pause_queue, methods=["POST"]),
    Route("/api/v1/queues/{name}/concurrency/override", override_limit, methods=["POST"]),
    Route("/api/v1/queues/{name}/concurrency/reset", reset_limit, methods=["POST"]),
]
