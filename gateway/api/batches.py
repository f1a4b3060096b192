"""``/api/v1/batches``: a batch of runs, with counts per status."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.routing import ApiRoute, Operation, Param
from gateway.api.views import BatchSummary, shaped
from gateway.services import services_of

__all__ = ["routes"]


async def get_batch(request: Request, project_id: str) -> Response:
    services = services_of(request)
    return shaped(
        BatchSummary, await services.runs.batch(project_id, request.path_params["batch_id"])
    )


routes = [
    ApiRoute(
        "GET",
        "/api/v1/batches/{batch_id}",
        get_batch,
        Operation(
            "A batch, with counts per status",
            "runs",
            {200: views.BatchSummary},
            params=(Param("batch_id", "path", "a batch's ID", required=True),),
            errors=(404,),
        ),
    ),
]
