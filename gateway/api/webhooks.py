"""``/api/v1/webhooks`` and ``/api/v1/deliveries``: endpoints, their secrets, the delivery log."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.bodies import json_object
from gateway.api.routing import PAGE, ApiRoute, Operation, Param, id_cursor, page_limit
from gateway.api.views import (
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
from gateway.services import Services, services_of
from webhooks.models import EndpointCreate, EndpointUpdate, RecoverRequest, RotateRequest

__all__ = ["routes"]

M = TypeVar("M", bound=BaseModel)


async def _body(request: Request, services: Services, model: type[M]) -> M:
    return await json_object(request, services.settings.max_body_bytes, model)


def _page(request: Request) -> tuple[int, str | None]:
    return page_limit(request), id_cursor(request, "msg")


async def create_endpoint(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await _body(request, services, EndpointCreate)
    endpoint = await services.webhooks.create_endpoint(project_id, body)
    return shaped(
        EndpointCreated,
        endpoint,
        status_code=201,
        headers={"location": f"/api/v1/webhooks/{endpoint['id']}"},
    )


async def list_endpoints(request: Request, project_id: str) -> Response:
    services = services_of(request)
    return shaped(EndpointList, {"data": await services.webhooks.list_endpoints(project_id)})


async def get_endpoint(request: Request, project_id: str) -> Response:
    services = services_of(request)
    endpoint_id = request.path_params["endpoint_id"]
    return shaped(EndpointView, await services.webhooks.get_endpoint(project_id, endpoint_id))


async def update_endpoint(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await _body(request, services, EndpointUpdate)
    endpoint_id = request.path_params["endpoint_id"]
    updated = await services.webhooks.update_endpoint(project_id, endpoint_id, body)
    return shaped(EndpointView, updated)


async def delete_endpoint(request: Request, project_id: str) -> Response:
    services = services_of(request)
    await services.webhooks.delete_endpoint(project_id, request.path_params["endpoint_id"])
    return Response(status_code=204)


async def get_secret(request: Request, project_id: str) -> Response:
    services = services_of(request)
    endpoint_id = request.path_params["endpoint_id"]
    return shaped(EndpointSecretView, await services.webhooks.get_secret(project_id, endpoint_id))


async def rotate_secret(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await _body(request, services, RotateRequest)
    endpoint_id = request.path_params["endpoint_id"]
    rotated = await services.webhooks.rotate_secret(project_id, endpoint_id, body)
    return shaped(RotatedSecret, rotated)


async def send_test(request: Request, project_id: str) -> Response:
    services = services_of(request)
    endpoint_id = request.path_params["endpoint_id"]
    delivery = await services.webhooks.send_test(project_id, endpoint_id)
    return shaped(DeliveryView, delivery, status_code=202)


async def endpoint_deliveries(request: Request, project_id: str) -> Response:
    services = services_of(request)
    limit, cursor = _page(request)
    page = await services.webhooks.endpoint_deliveries(
        project_id, request.path_params["endpoint_id"], limit=limit, cursor=cursor
    )
    return shaped(DeliveryPage, page)


async def run_deliveries(request: Request, project_id: str) -> Response:
    services = services_of(request)
    limit, cursor = _page(request)
    page = await services.webhooks.run_deliveries(
        project_id, request.path_params["run_id"], limit=limit, cursor=cursor
    )
    return shaped(DeliveryPage, page)


async def resend(request: Request, project_id: str) -> Response:
    services = services_of(request)
    delivery_id = request.path_params["delivery_id"]
    return shaped(
        DeliveryView,
        await services.webhooks.resend(project_id, delivery_id),
        status_code=202,
    )


async def recover(request: Request, project_id: str) -> Response:
    services = services_of(request)
    body = await _body(request, services, RecoverRequest)
    endpoint_id = request.path_params["endpoint_id"]
    result: dict[str, Any] = await services.webhooks.recover(project_id, endpoint_id, body)
    return shaped(RecoverAnswer, result, status_code=202)


async def signing_secret(request: Request, project_id: str) -> Response:
    services = services_of(request)
    return shaped(SigningSecret, {"secret": await services.webhooks.project_secret(project_id)})


_E = "/api/v1/webhooks/{endpoint_id}"
ENDPOINT_ID = Param("endpoint_id", "path", "an endpoint's ID (ep_…)", required=True)
RUN_ID = Param("run_id", "path", "a run's ID (run_…)", required=True)

routes = [
    ApiRoute(
        "POST",
        "/api/v1/webhooks",
        create_endpoint,
        Operation(
            "Register a callback endpoint",
            "webhooks",
            {201: views.EndpointCreated},
            EndpointCreate,
            errors=(400, 422),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/webhooks",
        list_endpoints,
        Operation("List endpoints", "webhooks", {200: views.EndpointList}),
    ),
    # Before the "{endpoint_id}" routes, which would otherwise take its name.
    ApiRoute(
        "GET",
        "/api/v1/webhooks/signing-secret",
        signing_secret,
        Operation(
            "The project's secret for options.callback_url", "webhooks", {200: views.SigningSecret}
        ),
    ),
    ApiRoute(
        "GET",
        _E,
        get_endpoint,
        Operation(
            "Get an endpoint",
            "webhooks",
            {200: views.EndpointView},
            params=(ENDPOINT_ID,),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "PATCH",
        _E,
        update_endpoint,
        Operation(
            "Change an endpoint (or re-enable it)",
            "webhooks",
            {200: views.EndpointView},
            EndpointUpdate,
            params=(ENDPOINT_ID,),
            errors=(400, 404, 422),
        ),
    ),
    ApiRoute(
        "DELETE",
        _E,
        delete_endpoint,
        Operation(
            "Delete an endpoint",
            "webhooks",
            {204: "deleted"},
            params=(ENDPOINT_ID,),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "GET",
        _E + "/secret",
        get_secret,
        Operation(
            "An endpoint's secrets",
            "webhooks",
            {200: views.EndpointSecretView},
            params=(ENDPOINT_ID,),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "POST",
        _E + "/rotate-secret",
        rotate_secret,
        Operation(
            "Rotate the secret",
            "webhooks",
            {200: views.RotatedSecret},
            RotateRequest,
            params=(ENDPOINT_ID,),
            errors=(404, 422),
        ),
    ),
    ApiRoute(
        "POST",
        _E + "/test",
        send_test,
        Operation(
            "Send a webhook.test event",
            "webhooks",
            {202: views.DeliveryView},
            params=(ENDPOINT_ID,),
            errors=(404,),
        ),
    ),
    ApiRoute(
        "GET",
        _E + "/deliveries",
        endpoint_deliveries,
        Operation(
            "An endpoint's messages",
            "webhooks",
            {200: views.DeliveryPage},
            params=(ENDPOINT_ID, *PAGE),
            errors=(404, 422),
        ),
    ),
    ApiRoute(
        "POST",
        _E + "/recover",
        recover,
        Operation(
            "Resend every failed (or also pending) message since a time",
            "webhooks",
            {202: views.RecoverAnswer},
            RecoverRequest,
            params=(ENDPOINT_ID,),
            errors=(404, 422),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/v1/runs/{run_id}/deliveries",
        run_deliveries,
        Operation(
            "A run's callback messages",
            "webhooks",
            {200: views.DeliveryPage},
            params=(RUN_ID, *PAGE),
            errors=(404, 422),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/v1/deliveries/{delivery_id}/resend",
        resend,
        Operation(
            "Send a message again",
            "webhooks",
            {202: views.DeliveryView},
            params=(Param("delivery_id", "path", "a message's ID (msg_…)", required=True),),
            errors=(404,),
        ),
    ),
]
