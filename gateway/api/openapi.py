"""``GET /openapi.json``: an OpenAPI 3.1 document built by walking ``app.routes``.

Each :class:`~gateway.api.routing.ApiRoute` carries its operation (summary,
answers, body, parameters, auth mode); the schemas come from the pydantic
models the API validates requests with (``gateway.runs.requests``,
``webhooks.models``) and shapes answers with (``gateway.api.views``). There
is no second table to keep in line: a route is documented because it exists.

Three things make it a typed contract for other languages:

- **Per-task operations.** Each registered task gets its own
  ``POST /api/v1/tasks/<name>/trigger`` beside the generic one, whose body has
  the task's payload schema and whose answer has its output schema
  (``@task(payload=..., output=...)``).
- **Webhooks.** The OpenAPI 3.1 ``webhooks`` section has each callback event
  (``gateway.api.event_types``), its body typed, ``type`` pinned to its name.
- **Optional is optional.** A field with a default is not in ``required``, and
  its default goes into its description rather than ``default``: generators
  such as openapi-typescript make a property with a ``default`` non-optional
  by default, which would make every trigger option mandatory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from gateway.api import views
from gateway.api.event_types import EVENTS, body_schema
from gateway.api.routing import ApiRoute, Operation
from gateway.runs.requests import TriggerOptions
from gateway.services import services_of

if TYPE_CHECKING:
    from jobs.tasks.registry import TaskDefinition, TaskRegistry

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


def _move_defaults(node: Any) -> None:
    """Every ``default`` into its schema's description, in place (see above)."""
    if isinstance(node, dict):
        if "default" in node and not isinstance(node["default"], dict | list):
            default = node.pop("default")
            said = node.get("description", "").rstrip()
            node["description"] = f"{said} Default: {json.dumps(default)}.".strip()
        elif "default" in node:
            node.pop("default")
        for value in node.values():
            _move_defaults(value)
    elif isinstance(node, list):
        for value in node:
            _move_defaults(value)


def _component(task: str) -> str:
    """A task's name as a component name: ``crop-image`` → ``CropImage``."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", task))


def build_document(
    app_routes: Iterable[BaseRoute], registry: TaskRegistry | None = None
) -> dict[str, Any]:
    """The document of every :class:`ApiRoute` in ``app_routes``, with an
    operation per task of ``registry``."""
    api = [r for r in app_routes if isinstance(r, ApiRoute)]
    models: list[type[BaseModel]] = [views.ErrorBody, TriggerOptions]
    for route in api:
        op: Operation = route.operation
        if op.body is not None:
            models.append(op.body)
        models.extend(a for a in op.answers.values() if not isinstance(a, str))
    models.extend(event.body for event in EVENTS)
    tasks: list[TaskDefinition] = []
    if registry is not None:
        tasks = [d for name in registry.names() if (d := registry.get(name)) is not None]
    for task in tasks:
        models.extend(m for m in (task.payload_model, task.output_model) if m is not None)
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
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    generic = paths.get("/api/v1/tasks/{task}/trigger", {}).get("post")
    for task in tasks if generic is not None else []:
        assert generic is not None
        name = _component(task.name)
        payload = ref(task.payload_model) if task.payload_model else {"description": "any JSON"}
        required = bool(
            task.payload_model and task.payload_model.model_json_schema().get("required")
        )
        schemas[f"{name}Trigger"] = {
            "type": "object",
            "title": f"{name}Trigger",
            "description": f"A trigger of `{task.name}`.",
            "properties": {"payload": payload, "options": ref(TriggerOptions)},
            "required": ["payload"] if required else [],
            "additionalProperties": False,
        }
        output = ref(task.output_model) if task.output_model else {}
        schemas[f"{name}Run"] = {
            "title": f"{name}Run",
            "description": f"A run of `{task.name}`.",
            "allOf": [
                ref(views.RunView),
                {
                    "type": "object",
                    "properties": {
                        "task": {"const": task.name},
                        "output": {"anyOf": [output, {"type": "null"}]} if output else {},
                    },
                },
            ],
        }
        run_ref = {"$ref": f"#/components/schemas/{name}Run"}
        responses = {
            code: (
                {**answer, "content": {"application/json": {"schema": run_ref}}}
                if code in ("200", "202")
                else answer
            )
            for code, answer in generic["responses"].items()
        }
        paths[f"/api/v1/tasks/{task.name}/trigger"] = {
            "post": {
                **generic,
                "summary": f"Trigger `{task.name}`"
                + (f": {task.description}" if task.description else ""),
                "operationId": _operation_id("post", f"/api/v1/tasks/{task.name}/trigger"),
                "parameters": [p for p in generic["parameters"] if p["name"] != "task"],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{name}Trigger"}
                        }
                    },
                },
                "responses": responses,
            }
        }
    webhooks = {
        event.name: {
            "post": {
                "summary": event.description,
                "operationId": "webhook_" + event.name.replace(".", "_"),
                "parameters": [
                    {
                        "name": header,
                        "in": "header",
                        "required": True,
                        "description": meaning,
                        "schema": {"type": "string"},
                    }
                    for header, meaning in (
                        ("webhook-id", "the message's ID: the same on every attempt"),
                        ("webhook-timestamp", "seconds since the epoch, when signed"),
                        ("webhook-signature", "`v1,<base64 HMAC-SHA256>`, space-separated"),
                    )
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": body_schema(event, ref(event.body))}
                    },
                },
                "responses": {
                    "2XX": {"description": "Received; any other answer is retried"},
                    "410": {"description": "Gone: disables the endpoint"},
                },
            }
        }
        for event in EVENTS
    }
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "webhook-job-gateway",
            "version": "0.1.0",
            "description": "Trigger runs over HTTP, follow them, and get signed callbacks.",
        },
        "paths": paths,
        "webhooks": webhooks,
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
    _move_defaults(document)
    return document


async def openapi(request: Request) -> Response:
    document = getattr(request.app.state, "openapi", None)
    if document is None:  # built once per process, from the routes it serves
        registry = services_of(request).registry
        document = request.app.state.openapi = build_document(request.app.routes, registry)
    return JSONResponse(document)


routes = [
    ApiRoute(
        "GET",
        "/openapi.json",
        openapi,
        Operation("This document", "health", {200: "OpenAPI 3.1"}, auth="none"),
    ),
]
