"""``wait.createToken``, ``wait.completeToken``, ``wait.retrieveToken`` and
``wait.listTokens``: Trigger.dev's waitpoint tokens are the gateway's
waitpoints. A token's ``url`` is the waitpoint's signed URL: a POST of any JSON
to it, with no key, completes it with that JSON, as on Trigger.dev.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.bodies import validate
from gateway.api.views import JSON
from gateway.runs.requests import WaitpointCreate
from gateway.services import services_of
from gateway.trigger_dev.common import after_cursor, json_body, project_of

__all__ = ["routes", "token_item"]

#: The gateway's waitpoint statuses as Trigger.dev's token statuses: a
#: canceled one (its run was canceled) never completes, as a timed-out one.
_STATUS = {
    "WAITING": "WAITING",
    "COMPLETED": "COMPLETED",
    "TIMED_OUT": "TIMED_OUT",
    "CANCELED": "TIMED_OUT",
}


def token_item(view: dict[str, Any], *, url: str) -> dict[str, Any]:
    """``WaitpointTokenItem`` of a waitpoint view."""
    item: dict[str, Any] = {
        "id": view["id"],
        "url": url,
        "status": _STATUS[view["status"]],
        "tags": view.get("tags") or [],
        "createdAt": view["created_at"],
    }
    for name, source in (("completedAt", "completed_at"), ("timeoutAt", "expires_at")):
        if view.get(source):
            item[name] = view[source]
    if view.get("idempotency_key"):
        item["idempotencyKey"] = view["idempotency_key"]
    return item


async def create_token(request: Request) -> Response:
    """``{id, isCached, url}``."""
    project_id = await project_of(request)
    services = services_of(request)
    body = await json_body(request)
    tags = body.get("tags")
    created = validate(
        WaitpointCreate,
        {
            "timeout": body.get("timeout"),
            "idempotency_key": body.get("idempotencyKey"),
            "tags": [tags] if isinstance(tags, str) else (tags or []),
        },
    )
    view, cached = await services.waitpoints.create_waitpoint(project_id, created)
    url = services.waitpoints.tokens.url_of(view["id"])
    return JSON({"id": view["id"], "isCached": cached, "url": url})


async def retrieve_token(request: Request) -> Response:
    """The token, and its output (JSON text, as the SDK reads a packet)."""
    project_id = await project_of(request)
    services = services_of(request)
    view = await services.waitpoints.waitpoint(project_id, request.path_params["token_id"])
    item = token_item(view, url=services.waitpoints.tokens.url_of(view["id"]))
    if view["status"] == "COMPLETED":
        item["output"] = orjson.dumps(view.get("output")).decode()
        item["outputType"] = "application/json"
    elif item["status"] == "TIMED_OUT":  # the SDK makes a WaitpointTimeoutError of it
        message = "the waitpoint timed out" if view["status"] == "TIMED_OUT" else "canceled"
        item["output"] = orjson.dumps({"message": message}).decode()
        item["outputType"] = "application/json"
        item["outputIsError"] = True
    return JSON(item)


async def complete_token(request: Request) -> Response:
    """``{success: true}``; the token's output is ``data``."""
    project_id = await project_of(request)
    services = services_of(request)
    body = await json_body(request)
    await services.waitpoints.complete_waitpoint(
        project_id, request.path_params["token_id"], body.get("data")
    )
    return JSON({"success": True})


async def list_tokens(request: Request) -> Response:
    """Newest first, by ``filter[status]``, paged by ``page[after]``."""
    project_id = await project_of(request)
    services = services_of(request)
    size = request.query_params.get("page[size]") or "25"
    asked = [s for s in (request.query_params.get("filter[status]") or "").split(",") if s]
    statuses = [mine for mine, theirs in _STATUS.items() if theirs in asked]
    if asked and not statuses:
        return JSON({"data": [], "pagination": {}})
    page = await services.waitpoints.list_waitpoints(
        project_id,
        limit=min(100, int(size)) if size.isdigit() and int(size) > 0 else 25,
        cursor=after_cursor(request, "wp"),
        statuses=tuple(statuses),
    )
    tokens = services.waitpoints.tokens
    return JSON(
        {
            "data": [token_item(v, url=tokens.url_of(v["id"])) for v in page["data"]],
            "pagination": {"next": page["next_cursor"]} if page["next_cursor"] else {},
        }
    )


routes = [
    Route("/api/v1/waitpoints/tokens", create_token, methods=["POST"]),
    Route("/api/v1/waitpoints/tokens", list_tokens, methods=["GET"]),
    Route("/api/v1/waitpoints/tokens/{token_id}", retrieve_token, methods=["GET"]),
    Route("/api/v1/waitpoints/tokens/{token_id}/complete", complete_token, methods=["POST"]),
]
