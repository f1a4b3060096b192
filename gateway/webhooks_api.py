"""Routes for webhook endpoints, their secrets and the delivery log."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth import Principal
from gateway.bodies import json_object
from gateway.errors import ValidationFailed
from gateway.services import Services
from gateway.views import (
    DeliveryPage,
    DeliveryView,
    EndpointCreated,
    EndpointList,
    EndpointSecretView,
    EndpointView,
    RecoverAnswer,
    RotatedSecret,
    SigningSecret,
    shaped,
)
from webhooks.models import EndpointCreate, EndpointUpdate, RecoverRequest, RotateRequest

__all__ = ["routes"]

M = TypeVar("M", bound=BaseModel)


async def _context(request: Request) -> tuple[Services, Principal]:
    services: Services = request.app.state.services
    return services, await services.auth.authenticate(request)


async def _body(request: Request, services: Services, model: type[M]) -> M:
    return await json_object(request, services.settings.max_body_bytes, model)


def _page(request: Request) -> tuple[int, str | None]:
    raw = request.query_params.get("limit", "50")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 100:
        raise ValidationFailed(
            "limit must be a whole number from 1 to 100",
            details=[{"path": "query.limit", "message": f"got {raw!r}", "type": "value_error"}],
        )
    return int(raw), request.query_params.get("cursor") or None


async def create_endpoint(request: Request) -> Response:
    services, principal = await _context(request)
    body = await _body(request, services, EndpointCreate)
    endpoint = await services.webhooks.create_endpoint(principal.project_id, body)
    return shaped(
        EndpointCreated,
        endpoint,
        status_code=201,
        headers={"location": f"/api/v1/webhooks/{endpoint['id']}"},
    )


async def list_endpoints(request: Request) -> Response:
    services, principal = await _context(request)
    return shaped(
        EndpointList, {"data": await services.webhooks.list_endpoints(principal.project_id)}
    )


async def get_endpoint(request: Request) -> Response:
    services, principal = await _context(request)
    endpoint_id = request.path_params["endpoint_id"]
    return shaped(
        EndpointView, await services.webhooks.get_endpoint(principal.project_id, endpoint_id)
    )


async def update_endpoint(request: Request) -> Response:
    services, principal = await _context(request)
    body = await _body(request, services, EndpointUpdate)
    endpoint_id = request.path_params["endpoint_id"]
    updated = await services.webhooks.update_endpoint(principal.project_id, endpoint_id, body)
    return shaped(EndpointView, updated)


async def delete_endpoint(request: Request) -> Response:
    services, principal = await _context(request)
    await services.webhooks.delete_endpoint(
        principal.project_id, request.path_params["endpoint_id"]
    )
    return Response(status_code=204)


async def get_secret(request: Request) -> Response:
    services, principal = await _context(request)
    endpoint_id = request.path_params["endpoint_id"]
    return shaped(
        EndpointSecretView, await services.webhooks.get_secret(principal.project_id, endpoint_id)
    )


async def rotate_secret(request: Request) -> Response:
    services, principal = await _context(request)
    body = await _body(request, services, RotateRequest)
    endpoint_id = request.path_params["endpoint_id"]
    rotated = await services.webhooks.rotate_secret(principal.project_id, endpoint_id, body)
    return shaped(RotatedSecret, rotated)


async def send_test(request: Request) -> Response:
    services, principal = await _context(request)
    endpoint_id = request.path_params["endpoint_id"]
    delivery = await services.webhooks.send_test(principal.project_id, endpoint_id)
    return shaped(DeliveryView, delivery, status_code=202)


async def endpoint_deliveries(request: Request) -> Response:
    services, principal = await _context(request)
    limit, cursor = _page(request)
    page = await services.webhooks.endpoint_deliveries(
        principal.project_id, request.path_params["endpoint_id"], limit=limit, cursor=cursor
    )
    return shaped(DeliveryPage, page)


async def run_deliveries(request: Request) -> Response:
    services, principal = await _context(request)
    limit, cursor = _page(request)
    page = await services.webhooks.run_deliveries(
        principal.project_id, request.path_params["run_id"], limit=limit, cursor=cursor
    )
    return shaped(DeliveryPage, page)


async def resend(request: Request) -> Response:
    services, principal = await _context(request)
    delivery_id = request.path_params["delivery_id"]
    return shaped(
        DeliveryView,
        await services.webhooks.resend(principal.project_id, delivery_id),
        status_code=202,
    )


async def recover(request: Request) -> Response:
    services, principal = await _context(request)
    body = await _body(request, services, RecoverRequest)
    endpoint_id = request.path_params["endpoint_id"]
    result: dict[str, Any] = await services.webhooks.recover(
        principal.project_id, endpoint_id, body
    )
    return shaped(RecoverAnswer, result, status_code=202)


async def signing_secret(request: Request) -> Response:
    services, principal = await _context(request)
    return shaped(
        SigningSecret, {"secret": await services.webhooks.project_secret(principal.project_id)}
    )


_E = "/api/v1/webhooks/{endpoint_id}"

routes = [
    Route("/api/v1/webhooks", create_endpoint, methods=["POST"]),
    Route("/api/v1/webhooks", list_endpoints, methods=["GET"]),
    # Before the "{endpoint_id}" routes, which would otherwise take its name.
    Route("/api/v1/webhooks/signing-secret", signing_secret, methods=["GET"]),
    Route(_E, get_endpoint, methods=["GET"]),
    Route(_E, update_endpoint, methods=["PATCH"]),
    Route(_E, delete_endpoint, methods=["DELETE"]),
    Route(_E + "/secret", get_secret, methods=["GET"]),
    Route(_E + "/rotate-secret", rotate_secret, methods=["POST"]),
    Route(_E + "/test", send_test, methods=["POST"]),
    Route(_E + "/deliveries", endpoint_deliveries, methods=["GET"]),
    Route(_E + "/recover", recover, methods=["POST"]),
    Route("/api/v1/runs/{run_id}/deliveries", run_deliveries, methods=["GET"]),
    Route("/api/v1/deliveries/{delivery_id}/resend", resend, methods=["POST"]),
]
