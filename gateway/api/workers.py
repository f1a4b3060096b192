"""``/api/v1/workers``: the worker processes that are there, and what each holds."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.routing import ApiRoute, Operation
from gateway.api.views import WorkerList, shaped
from gateway.services import services_of

__all__ = ["routes"]


async def list_workers(request: Request, project_id: str) -> Response:
    workers = await services_of(request).workers.list(project_id)
    return shaped(WorkerList, {"data": workers})


routes = [
    ApiRoute(
        "GET",
        "/api/v1/workers",
        list_workers,
        Operation(
            "List the worker processes: online, lost and lately stopped, with their "
            "slots and the runs of yours each holds",
            "workers",
            {200: views.WorkerList},
            errors=(503,),
        ),
    ),
]
