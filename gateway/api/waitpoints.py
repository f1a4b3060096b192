"""``/api/v1/waitpoints``: what a run waits for outside it (an approval, a callback)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.bodies import json_object, parse_json, read_body, require_json
from gateway.api.routing import PAGE, ApiRoute, Operation, Param, id_cursor, page_limit
from gateway.api.views import WaitpointList, WaitpointView, shaped
from gateway.errors import ValidationFailed
from gateway.runs.requests import WaitpointComplete, WaitpointCreate
from gateway.services import services_of
from gateway.waitpoints.waitpoints import WaitpointNotFound

__all__ = ["routes"]


async def create_waitpoint(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, WaitpointCreate)
    view, cached = await services.waitpoints.create_waitpoint(project_id, body)
    view["is_cached"] = cached
    return shaped(
        WaitpointView,
        view,
        status_code=200 if cached else 201,
        headers={"location": f"/api/v1/waitpoints/{view['id']}"},
    )


async def list_waitpoints(request: Request, project_id: str) -> Response:
    services = services_of(request)
    statuses = tuple(
        s for raw in request.query_params.getlist("status") for s in raw.upper().split(",") if s
    )
    unknown = [s for s in statuses if s not in ("WAITING", "COMPLETED", "TIMED_OUT", "CANCELED")]
    if unknown:
        raise ValidationFailed(
            details=[
                {"path": "query.status", "type": "enum", "message": f"unknown status {s!r}"}
                for s in unknown
            ]
        )
    page = await services.waitpoints.list_waitpoints(
        project_id,
        limit=page_limit(request),
        cursor=id_cursor(request, "wp"),
        statuses=statuses,
    )
    return shaped(WaitpointList, page)


async def get_waitpoint(request: Request, project_id: str) -> Response:
    services = services_of(request)
    return shaped(
        WaitpointView,
        await services.waitpoints.waitpoint(project_id, request.path_params["waitpoint_id"]),
    )


async def complete_waitpoint(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await json_object(request, services.settings.max_body_bytes, WaitpointComplete)
    view = await services.waitpoints.complete_waitpoint(
        project_id, request.path_params["waitpoint_id"], body.output
    )
    return shaped(WaitpointView, view)


async def waitpoint_callback(request: Request) -> Response:
    """A POST of any JSON (the waitpoint's output) to its signed URL, with no key."""
    services = services_of(request)
    await services.schema.require()
    waitpoint_id = request.path_params["waitpoint_id"]
    if services.waitpoints.tokens.waitpoint_of(request.path_params["token"]) != waitpoint_id:
        raise WaitpointNotFound(waitpoint_id)
    raw = await read_body(request, services.settings.max_body_bytes)
    if raw.strip():
        require_json(request)
    output = parse_json(raw) if raw.strip() else None
    view = await services.waitpoints.complete_waitpoint(None, waitpoint_id, output)
    return shaped(WaitpointView, view)


WAITPOINT_ID = Param("waitpoint_id", "path", "a waitpoint's ID (wp_…)", required=True)

routes = [
    ApiRoute(
        "GET",
        "/api/v1/waitpoints",
        list_waitpoints,
        Operation(
            "List waitpoints, newest first",
            "waitpoints",
            {200: views.WaitpointList},
            params=(
                Param("status", "query", "one or more statuses, comma-separated"),
                *PAGE,
            ),
            errors=(422,),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/waitpoints",
        create_waitpoint,
        Operation(
            "Make a waitpoint, with a signed URL that completes it",
            "waitpoints",
            {201: views.WaitpointView, 200: views.WaitpointView},
            WaitpointCreate,
            errors=(400, 413, 422),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/waitpoints/{waitpoint_id}",
        get_waitpoint,
        Operation(
            "A waitpoint: its status, output and times",
            "waitpoints",
            {200: views.WaitpointView},
            params=(WAITPOINT_ID,),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/waitpoints/{waitpoint_id}/complete",
        complete_waitpoint,
        Operation(
            "Complete a waitpoint with an output (once)",
            "waitpoints",
            {200: views.WaitpointView},
            WaitpointComplete,
            params=(WAITPOINT_ID,),
            errors=(400, 404, 409, 413, 422),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/waitpoints/{waitpoint_id}/callback/{token}",
        waitpoint_callback,
        Operation(
            "Complete a waitpoint through its signed URL (no API key; any JSON body)",
            "waitpoints",
            {200: views.WaitpointView},
            auth="link",
            params=(
                WAITPOINT_ID,
                Param("token", "path", "the signed part of the waitpoint's url", required=True),
            ),
            errors=(400, 401, 404, 409, 413, 415, 422),
        ),
    ),
]
