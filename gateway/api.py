"""The HTTP routes of the public API, the worker events and the health checks."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.bodies import parse_json, signed_body, validate
from gateway.errors import (
    error_response,
)
from gateway.schemas import WorkerEvent
from gateway.services import Services
from gateway.views import TaskList, shaped
from gateway.webhooks import DeliveryAttemptReport
from jobs.report import EVENTS_PATH, PREPARE_PATH

__all__ = ["routes"]

M = TypeVar("M", bound=BaseModel)


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def list_tasks(request: Request) -> Response:
    services = _services(request)
    await services.auth.authenticate(request)
    return shaped(TaskList, {"data": services.registry.describe()})


async def _signed_json(request: Request, services: Services) -> Any:
    """The JSON of a worker's call, once its signature checks out (else 401)."""
    settings = services.settings
    return parse_json(await signed_body(request, settings, settings.max_output_bytes + 64 * 1024))


async def worker_event(request: Request) -> Response:
    services = _services(request)
    data = await _signed_json(request, services)
    if isinstance(data, dict) and data.get("type") == "delivery.attempt":
        report = validate(DeliveryAttemptReport, data)
        recorded = await services.webhooks.record_attempt(report)
        if recorded["recorded"]:
            # Wakes the dashboard's live feed; no run waits on a delivery.
            await services.notifier.publish(f"delivery:{report.delivery_id}")
        return JSONResponse(recorded)
    event = validate(WorkerEvent, data)
    outcome = await services.runs.apply_event(event)
    return JSONResponse(outcome.to_dict())


class _PrepareRequest(BaseModel):
    delivery_id: str = Field(max_length=40)


async def prepare_delivery(request: Request) -> Response:
    services = _services(request)
    prepare = validate(_PrepareRequest, await _signed_json(request, services))
    return JSONResponse(await services.webhooks.prepare(prepare.delivery_id))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    services = _services(request)
    checks: dict[str, str] = {}

    async def check(name: str, probe: Any) -> None:
        try:
            await asyncio.wait_for(probe, timeout=2.0)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"[:300]

    await asyncio.gather(
        check("database", services.db.ping()), check("redis", services.redis.ping())
    )
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ok", "checks": checks})
    failing = [{"check": k, "message": v} for k, v in checks.items() if v != "ok"]
    return error_response(503, "not_ready", "a dependency does not answer", failing)


routes = [
    Route("/api/v1/tasks", list_tasks, methods=["GET"]),
    Route(EVENTS_PATH, worker_event, methods=["POST"]),
    Route(PREPARE_PATH, prepare_delivery, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
