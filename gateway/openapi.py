"""``GET /openapi.json``: an OpenAPI 3.1 document built from the models the
API validates requests with (``gateway.schemas``, ``webhooks.models``) and
shapes answers with (``gateway.views``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import views
from gateway.schemas import BatchRequest, RescheduleRequest, TriggerRequest
from webhooks.models import EndpointCreate, EndpointUpdate, RecoverRequest, RotateRequest

__all__ = ["OPERATIONS", "build_document", "routes"]

Auth = Literal["key", "key_or_token", "none", "link"]


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query", "header"]
    description: str
    schema: dict[str, Any] = dataclasses.field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    answers: dict[int, type[BaseModel] | str]
    body: type[BaseModel] | None = None
    auth: Auth = "key"
    params: tuple[Param, ...] = ()
    #: Error answers besides those every authenticated call may give.
    errors: tuple[int, ...] = ()


RUN_ID = Param("run_id", "path", "a run's ID (run_…)", required=True)
ENDPOINT_ID = Param("endpoint_id", "path", "an endpoint's ID (ep_…)", required=True)
PAGE = (
    Param("limit", "query", "1 to 100", {"type": "integer"}),
    Param("cursor", "query", "next_cursor of the previous page"),
)
TOKEN = Param("token", "query", "a run's public_access_token, instead of a bearer key")
SSE = "text/event-stream: one `status` event per status change, closing after the final one"

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/api/v1/tasks/{task}/trigger",
        "Trigger a run",
        "runs",
        {202: views.RunView, 200: views.RunView},
        TriggerRequest,
        params=(
            Param("task", "path", "the task's name", required=True),
            Param("idempotency-key", "header", "same as options.idempotency_key"),
        ),
        errors=(400, 404, 413, 422),
    ),
    Operation(
        "POST",
        "/api/v1/tasks/batch",
        "Trigger up to 500 runs at once",
        "runs",
        {202: views.BatchCreated},
        BatchRequest,
        errors=(400, 413, 422),
    ),
    Operation(
        "GET",
        "/api/v1/tasks",
        "List the tasks and their payload schemas",
        "tasks",
        {200: views.TaskList},
    ),
    Operation(
        "GET",
        "/api/v1/runs",
        "List runs, newest first",
        "runs",
        {200: views.RunPage},
        params=(
            Param("status", "query", "one or more statuses, comma-separated"),
            Param("task", "query", "one or more tasks, comma-separated"),
            Param("tag", "query", "runs with this tag"),
            Param("created_after", "query", "ISO-8601"),
            Param("created_before", "query", "ISO-8601"),
            *PAGE,
        ),
        errors=(422,),
    ),
    Operation(
        "GET",
        "/api/v1/runs/{run_id}",
        "Get a run (long-poll with ?wait=)",
        "runs",
        {200: views.RunView},
        auth="key_or_token",
        params=(
            RUN_ID,
            Param(
                "wait", "query", "seconds to wait for a final status (<= 60)", {"type": "number"}
            ),
            TOKEN,
        ),
        errors=(404, 422),
    ),
    Operation(
        "GET",
        "/api/v1/runs/{run_id}/events",
        "Follow a run (Server-Sent Events)",
        "runs",
        {200: SSE},
        auth="key_or_token",
        params=(RUN_ID, TOKEN),
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/v1/runs/{run_id}/cancel",
        "Cancel a run (and a workflow's children)",
        "runs",
        {200: views.RunView},
        params=(RUN_ID,),
        errors=(404, 409),
    ),
    Operation(
        "POST",
        "/api/v1/runs/{run_id}/replay",
        "Run the same task and payload again",
        "runs",
        {202: views.RunView},
        params=(RUN_ID,),
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/v1/runs/{run_id}/reschedule",
        "Move a DELAYED run",
        "runs",
        {200: views.RunView},
        RescheduleRequest,
        params=(RUN_ID,),
        errors=(404, 409, 422),
    ),
    Operation(
        "GET",
        "/api/v1/runs/{run_id}/deliveries",
        "A run's callback messages",
        "webhooks",
        {200: views.DeliveryPage},
        params=(RUN_ID, *PAGE),
        errors=(404, 422),
    ),
    Operation(
        "GET",
        "/api/v1/batches/{batch_id}",
        "A batch, with counts per status",
        "runs",
        {200: views.BatchSummary},
        params=(Param("batch_id", "path", "a batch's ID", required=True),),
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/v1/webhooks",
        "Register a callback endpoint",
        "webhooks",
        {201: views.EndpointCreated},
        EndpointCreate,
        errors=(400, 422),
    ),
    Operation("GET", "/api/v1/webhooks", "List endpoints", "webhooks", {200: views.EndpointList}),
    Operation(
        "GET",
        "/api/v1/webhooks/signing-secret",
        "The project's secret for options.callback_url",
        "webhooks",
        {200: views.SigningSecret},
    ),
    Operation(
        "GET",
        "/api/v1/webhooks/{endpoint_id}",
        "Get an endpoint",
        "webhooks",
        {200: views.EndpointView},
        params=(ENDPOINT_ID,),
        errors=(404,),
    ),
    Operation(
        "PATCH",
        "/api/v1/webhooks/{endpoint_id}",
        "Change an endpoint (or re-enable it)",
        "webhooks",
        {200: views.EndpointView},
        EndpointUpdate,
        params=(ENDPOINT_ID,),
        errors=(400, 404, 422),
    ),
    Operation(
        "DELETE",
        "/api/v1/webhooks/{endpoint_id}",
        "Delete an endpoint",
        "webhooks",
        {204: "deleted"},
        params=(ENDPOINT_ID,),
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/v1/webhooks/{endpoint_id}/secret",
        "An endpoint's secrets",
        "webhooks",
        {200: views.EndpointSecretView},
        params=(ENDPOINT_ID,),
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/v1/webhooks/{endpoint_id}/rotate-secret",
        "Rotate the secret",
        "webhooks",
        {200: views.RotatedSecret},
        RotateRequest,
        params=(ENDPOINT_ID,),
        errors=(404, 422),
    ),
    Operation(
        "POST",
        "/api/v1/webhooks/{endpoint_id}/test",
        "Send a webhook.test event",
        "webhooks",
        {202: views.DeliveryView},
        params=(ENDPOINT_ID,),
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/v1/webhooks/{endpoint_id}/deliveries",
        "An endpoint's messages",
        "webhooks",
        {200: views.DeliveryPage},
        params=(ENDPOINT_ID, *PAGE),
        errors=(404, 422),
    ),
    Operation(
        "POST",
        "/api/v1/webhooks/{endpoint_id}/recover",
        "Resend every failed message since a time",
        "webhooks",
        {202: views.RecoverAnswer},
        RecoverRequest,
        params=(ENDPOINT_ID,),
        errors=(404, 422),
    ),
    Operation(
        "POST",
        "/api/v1/deliveries/{delivery_id}/resend",
        "Send a message again",
        "webhooks",
        {202: views.DeliveryView},
        params=(Param("delivery_id", "path", "a message's ID (msg_…)", required=True),),
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/v1/artifacts/{artifact_id}/link",
        "A fresh signed link",
        "artifacts",
        {200: views.ArtifactLink},
        params=(Param("artifact_id", "path", "art_…", required=True),),
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/v1/artifacts/{token}",
        "Download an artifact (signed link)",
        "artifacts",
        {200: "the file, with its content type"},
        auth="link",
        params=(Param("token", "path", "from an artifact's url", required=True),),
        errors=(403, 404, 410),
    ),
    Operation(
        "GET", "/healthz", "The process is alive", "health", {200: views.Health}, auth="none"
    ),
    Operation(
        "GET",
        "/readyz",
        "The database and Redis answer",
        "health",
        {200: views.Health},
        auth="none",
        errors=(503,),
    ),
    Operation("GET", "/openapi.json", "This document", "health", {200: "OpenAPI 3.1"}, auth="none"),
    Operation(
        "GET",
        "/metrics",
        "Prometheus metrics",
        "health",
        {200: "text/plain in the Prometheus format"},
        auth="none",
    ),
)

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    400: "Bad request",
    401: "No or bad credentials",
    403: "Bad link",
    404: "Not found",
    409: "Conflict",
    410: "Link expired",
    413: "Body too large",
    422: "Does not fit the schema",
    429: "Rate limited",
    503: "A dependency does not answer",
}


def build_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [views.ErrorBody]
    for op in OPERATIONS:
        if op.body is not None:
            models.append(op.body)
        models.extend(a for a in op.answers.values() if not isinstance(a, str))
    unique = list(dict.fromkeys(models))
    keyed, defs = models_json_schema(
        [(m, "validation") for m in unique],
        ref_template="#/components/schemas/{model}",
        title="gateway",
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return keyed[(model, "validation")]

    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {}
        for code, answer in op.answers.items():
            entry: dict[str, Any] = {"description": _STATUS_TEXT[code]}
            if isinstance(answer, str):
                entry["description"] += f": {answer}"
            else:
                entry["content"] = {"application/json": {"schema": ref(answer)}}
            responses[str(code)] = entry
        errors = set(op.errors)
        if op.auth in ("key", "key_or_token"):
            errors |= {401, 429}
        for code in sorted(errors):
            responses[str(code)] = {
                "description": _STATUS_TEXT[code],
                "content": {"application/json": {"schema": ref(views.ErrorBody)}},
            }
        operation: dict[str, Any] = {
            "summary": op.summary,
            "tags": [op.tag],
            "operationId": f"{op.method.lower()}_{op.path.strip('/').replace('/', '_')}".replace(
                "{", ""
            )
            .replace("}", "")
            .replace("-", "_")
            .replace(".", "_"),
            "responses": responses,
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required,
                    "description": p.description,
                    "schema": p.schema,
                }
                for p in op.params
            ],
        }
        if op.auth == "key":
            operation["security"] = [{"apiKey": []}]
        elif op.auth == "key_or_token":
            operation["security"] = [{"apiKey": []}, {"publicToken": []}]
        else:
            operation["security"] = []
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.body)}},
            }
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "webhook-job-gateway",
            "version": "0.1.0",
            "description": "Trigger runs over HTTP, follow them, and get signed callbacks.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a project's secret key (gw_sk_…)",
                },
                "publicToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a run's public_access_token (pat_…), read-only, for that run",
                },
            },
        },
    }


_DOCUMENT: dict[str, Any] | None = None


async def openapi(request: Request) -> Response:
    global _DOCUMENT
    if _DOCUMENT is None:
        _DOCUMENT = build_document()
    return JSONResponse(_DOCUMENT)


routes = [Route("/openapi.json", openapi, methods=["GET"])]
