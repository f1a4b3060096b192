"""``/api/v1/runs/bulk/…`` and ``/api/v1/bulk/{id}``: cancel or replay many runs at once."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.bodies import json_object
from gateway.api.routing import ApiRoute, Operation, Param
from gateway.api.views import BulkCreated, BulkView, shaped
from gateway.runs.requests import BulkRequest
from gateway.services import services_of

__all__ = ["routes"]


async def bulk_cancel(request: Request, project_id: str) -> Response:
    return await _bulk_action(request, project_id, "cancel")


async def bulk_replay(request: Request, project_id: str) -> Response:
    return await _bulk_action(request, project_id, "replay")


async def _bulk_action(request: Request, project_id: str, action: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, BulkRequest)
    bulk = await services.flow.bulk(project_id, action, body.selection())
    return shaped(
        BulkCreated,
        {**bulk, "bulk_id": bulk["id"]},
        status_code=202,
        headers={"location": f"/api/v1/bulk/{bulk['id']}"},
    )


async def get_bulk(request: Request, project_id: str) -> Response:
    services = services_of(request)
    return shaped(
        BulkView, await services.flow.bulk_status(project_id, request.path_params["bulk_id"])
    )


def _operation(summary: str) -> Operation:
    return Operation(summary, "runs", {202: views.BulkCreated}, BulkRequest, errors=(400, 413, 422))


# Before "/api/v1/runs/{run_id}/cancel", which "bulk" would match.
routes = [
    ApiRoute(
        "POST",
        "/api/v1/runs/bulk/cancel",
        bulk_cancel,
        _operation("Cancel every run a filter or a list of IDs selects (in the background)"),
    ),
    ApiRoute(
        "POST",
        "/api/v1/runs/bulk/replay",
        bulk_replay,
        _operation("Replay every run a filter or a list of IDs selects (in the background)"),
    ),
    ApiRoute(
        "GET",
        "/api/v1/bulk/{bulk_id}",
        get_bulk,
        Operation(
            "A bulk action and how far it has got",
            "runs",
            {200: views.BulkView},
            params=(Param("bulk_id", "path", "a bulk action's ID (bulk_…)", required=True),),
            errors=(404,),
        ),
    ),
]
