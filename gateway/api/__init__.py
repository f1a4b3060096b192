"""The HTTP API: one module per resource, and what they share.

``tasks`` (trigger, batch), ``runs``, ``bulk``, ``queues``, ``schedules``,
``waitpoints``, ``batches``, ``webhooks``, ``artifacts``, ``workers``, ``health`` and
``openapi`` are the public API; ``internal`` is what workers call.
``routing`` ties each route to its documented operation and auth mode (who
calls is ``gateway.auth``'s to say); ``bodies`` reads requests into the models
the rooms define (``gateway.runs.requests``, ``webhooks.models``) and ``views``
shapes answers.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

__all__ = ["api_routes"]


def api_routes() -> list[BaseRoute]:
    """Every route of the API, the public ones and the workers'."""
    from gateway.api import (
        artifacts,
        batches,
        bulk,
        event_types,
        health,
        internal,
        openapi,
        queues,
        runs,
        schedules,
        tasks,
        waitpoints,
        webhooks,
        workers,
    )

    return [
        *tasks.routes,
        *bulk.routes,  # before runs: "/api/v1/runs/bulk/cancel" is no run's
        *runs.routes,
        *queues.routes,
        *schedules.routes,
        *waitpoints.routes,
        *batches.routes,
        *webhooks.routes,
        *event_types.routes,
        *artifacts.routes,
        *workers.routes,
        *internal.routes,
        *health.routes,
        *openapi.routes,
    ]
