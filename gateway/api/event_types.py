"""``/api/v1/event-types``: every kind of callback, with the schema of its body.

The same catalogue makes the ``webhooks`` section of ``/openapi.json``
(``gateway.api.openapi``), so a receiver written in any language can be typed
from either. The names are ``webhooks.outbox``'s: the test fails if one is
added there and not here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import views
from gateway.api.routing import ApiRoute, Operation
from gateway.api.views import EventTypeList, shaped

__all__ = ["EVENTS", "EventSpec", "body_schema", "routes"]


@dataclasses.dataclass(frozen=True)
class EventSpec:
    name: str
    description: str
    body: type[BaseModel]
    in_wildcard: bool = True


EVENTS = (
    EventSpec(
        "run.started",
        "A run's first attempt started executing (subscribe by name: `*` leaves it out).",
        views.RunEventBody,
        in_wildcard=False,
    ),
    EventSpec(
        "run.completed", "A run ended COMPLETED; `data.output` is its output.", views.RunEventBody
    ),
    EventSpec(
        "run.failed",
        "A run ended FAILED after its last attempt; `data.error` says why.",
        views.RunEventBody,
    ),
    EventSpec("run.canceled", "A run was canceled.", views.RunEventBody),
    EventSpec("run.expired", "A run was not started within its `ttl`.", views.RunEventBody),
    EventSpec("run.timed_out", "A run's attempt ran past its `max_duration`.", views.RunEventBody),
    EventSpec(
        "waitpoint.completed",
        "A waitpoint was completed (through the API or its URL) or timed out.",
        views.WaitpointEventBody,
    ),
    EventSpec(
        "webhook.test",
        "`POST /api/v1/webhooks/{id}/test` to that endpoint alone.",
        views.TestEventBody,
        in_wildcard=False,
    ),
)


def body_schema(event: EventSpec, ref: Any) -> dict[str, Any]:
    """The body's schema: the model's (``ref``: a ``$ref`` to it, or the
    schema itself) with ``type`` pinned to this event's name."""
    return {
        "allOf": [
            ref,
            {"type": "object", "properties": {"type": {"const": event.name}}, "required": ["type"]},
        ]
    }


_CATALOGUE: list[dict[str, Any]] | None = None


def catalogue() -> list[dict[str, Any]]:
    """Each event with a standalone JSON Schema of its body (made once)."""
    global _CATALOGUE
    if _CATALOGUE is None:
        _CATALOGUE = []
        for event in EVENTS:
            schema = event.body.model_json_schema()
            defs = schema.pop("$defs", {})
            standalone = body_schema(event, schema)
            if defs:
                standalone["$defs"] = defs
            _CATALOGUE.append(
                {
                    "name": event.name,
                    "description": event.description,
                    "in_wildcard": event.in_wildcard,
                    "schema": standalone,
                }
            )
    return _CATALOGUE


async def list_event_types(request: Request, project_id: str) -> Response:
    return shaped(EventTypeList, {"data": catalogue()})


routes = [
    ApiRoute(
        "GET",
        "/api/v1/event-types",
        list_event_types,
        Operation(
            "List the callback event types, with the JSON Schema of each body",
            "webhooks",
            {200: views.EventTypeList},
        ),
    ),
]
