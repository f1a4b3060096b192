"""``/api/v1/queues``: a project's queues, their limits and counts; pausing them."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.bodies import json_object
from gateway.api.routing import PAGE, ApiRoute, Operation, Param, invalid_cursor, page_limit
from gateway.api.views import QueueList, QueueView, shaped
from gateway.runs.requests import QueueCreate, QueueUpdate
from gateway.services import services_of

__all__ = ["routes"]


async def list_queues(request: Request, project_id: str) -> Response:
    limit = page_limit(request)
    after = request.query_params.get("cursor") or None
    if after is not None and len(after) > 200:
        raise invalid_cursor(after)
    page = await services_of(request).flow.queues(project_id, limit=limit, after=after)
    return shaped(QueueList, page)


async def create_queue(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, QueueCreate)
    queue = await services.flow.create_queue(
        project_id, body.name, body.concurrency_limit, body.paused
    )
    return shaped(
        QueueView, queue, status_code=201, headers={"location": f"/api/v1/queues/{body.name}"}
    )


async def get_queue(request: Request, project_id: str) -> Response:
    services = services_of(request)
    return shaped(QueueView, await services.flow.queue(project_id, request.path_params["name"]))


async def update_queue(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, QueueUpdate)
    queue = await services.flow.update_queue(
        project_id, request.path_params["name"], body.changes()
    )
    return shaped(QueueView, queue)


NAME = Param("name", "path", "a queue's name (a task's own queue is named after it)", required=True)

routes = [
    ApiRoute(
        "GET",
        "/api/v1/queues",
        list_queues,
        Operation(
            "List the queues: configured ones, those runs are in, each task's own",
            "queues",
            {200: views.QueueList},
            params=PAGE,
            errors=(400, 422),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/queues",
        create_queue,
        Operation(
            "Make a queue with a concurrency limit",
            "queues",
            {201: views.QueueView},
            QueueCreate,
            errors=(400, 409, 413, 422),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/queues/{name}",
        get_queue,
        Operation(
            "A queue, with its limit and counts",
            "queues",
            {200: views.QueueView},
            params=(NAME,),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "PATCH",
        "/api/v1/queues/{name}",
        update_queue,
        Operation(
            "Change a queue's limit, pause or resume it",
            "queues",
            {200: views.QueueView},
            QueueUpdate,
            params=(NAME,),
            errors=(400, 404, 413, 422),
        ),
    ),
]
