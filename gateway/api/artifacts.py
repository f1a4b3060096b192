"""``/api/v1/artifacts``: a file by its signed link, and a fresh link for one."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.routing import ApiRoute, Operation, Param
from gateway.api.views import ArtifactLink, shaped
from gateway.services import services_of

__all__ = ["routes"]


async def download(request: Request) -> Response:
    """Anyone with a valid link gets the file."""
    store = services_of(request).artifacts
    row = await store.find(store.artifact_of(request.path_params["token"]))
    return await store.response(row, {"cache-control": "private, max-age=3600"})


async def fresh_link(request: Request, project_id: str) -> Response:
    """A new signed link for one of the project's artifacts."""
    store = services_of(request).artifacts
    row = await store.find(request.path_params["artifact_id"], project_id)
    return shaped(ArtifactLink, store.link(row))


routes = [
    ApiRoute(
        "GET",
        "/api/v1/artifacts/{artifact_id:str}/link",
        fresh_link,
        Operation(
            "A fresh signed link",
            "artifacts",
            {200: views.ArtifactLink},
            params=(Param("artifact_id", "path", "art_…", required=True),),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/artifacts/{token:str}",
        download,
        Operation(
            "Download an artifact (signed link)",
            "artifacts",
            {200: "the file, with its content type"},
            auth="link",
            params=(Param("token", "path", "from an artifact's url", required=True),),
            errors=(403, 404, 410),
        ),
    ),
]
