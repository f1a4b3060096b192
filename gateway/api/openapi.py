"""``GET /openapi.json``: an OpenAPI 3.1 document built by walking ``app.routes``.

Each :class:`~gateway.api.routing.ApiRoute` carries its operation (summary,
answers, body, parameters, auth mode); the schemas come from the pydantic
models the API validates requests with (``gateway.runs.requests``,
``webhooks.models``) and shapes answers with (``gateway.api.views``). There
is no second table to keep in line: a route is documented because it exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from gateway.api import views
from gateway.api.routing import ApiRoute, Operation

__all__ = ["build_document", "routes"]

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
    415: "Body not sent as JSON",
    422: "Does not fit the schema",
    429: "Rate limited",
    503: "A dependency does not answer",
}


def _operation_id(method: str, path: str) -> str:
    return re.sub(r"[{}]", "", f"{method.lower()}_{path.strip('/').replace('/', '_')}").translate(
        str.maketrans("-.", "__")
    )


def build_document(app_routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The document of every :class:`ApiRoute` in ``app_routes``."""
    api = [r for r in app_routes if isinstance(r, ApiRoute)]
    models: list[type[BaseModel]] = [views.ErrorBody]
    for route in api:
        op: Operation = route.operation
        if op.body is not None:
            models.append(op.body)
        models.extend(a for a in op.answers.values() if not isinstance(a, str))
    keyed, defs = models_json_schema(
        [(m, "validation") for m in dict.fromkeys(models)],
        ref_template="#/components/schemas/{model}",
        title="gateway",
    )

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return keyed[(model, "validation")]

    paths: dict[str, Any] = {}
    for route in api:
        op = route.operation
        path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path)
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
        if op.body is not None:
            errors.add(415)  # a body declared as anything but JSON
        if any(p.name == "cursor" for p in op.params):
            errors.add(400)  # a cursor no page gave
        for code in sorted(errors):
            responses[str(code)] = {
                "description": _STATUS_TEXT[code],
                "content": {"application/json": {"schema": ref(views.ErrorBody)}},
            }
        security: list[dict[str, list[str]]] = []
        if op.auth in ("key", "key_or_token"):
            security.append({"apiKey": []})
        if op.auth == "key_or_token":
            security.append({"publicToken": []})
        operation: dict[str, Any] = {
            "summary": op.summary,
            "tags": [op.tag],
            "operationId": _operation_id(route.method, path),
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
            "security": security,
        }
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.body)}},
            }
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "webhook-job-gateway",
            "version": "0.1.0",
            "description": "Trigger runs over HTTP, follow them, and get signed callbacks.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(defs.get("$defs", {})),
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


async def openapi(request: Request) -> Response:
    document = getattr(request.app.state, "openapi", None)
    if document is None:  # built once per process, from the routes it serves
        document = request.app.state.openapi = build_document(request.app.routes)
    return JSONResponse(document)


routes = [
    ApiRoute(
        "GET",
        "/openapi.json",
        openapi,
        Operation("This document", "health", {200: "OpenAPI 3.1"}, auth="none"),
    ),
]
