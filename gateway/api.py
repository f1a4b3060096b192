"""The HTTP routes of the public API, the worker events and the health checks."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.bodies import parse_json, signed_body, validate
from gateway.errors import PayloadTooLarge, ValidationFailed, error_response
from gateway.services import Services
from gateway.views import TaskList, shaped
from jobs.protocol import EVENTS_PATH, PREPARE_PATH, WorkerEvent, dumps
from webhooks.models import DeliveryAttemptReport

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


def _check_meaning(services: Services, event: WorkerEvent, body_size: int) -> None:
    """What a signature cannot tell: an output within ``MAX_OUTPUT_BYTES``
    (413, so the worker ends the run with ``output_too_large``), children of
    known tasks. (A ``waiting`` event for a run that is not a workflow is
    refused where the run is read, in ``transitions``.)"""
    limit = services.settings.max_output_bytes
    if body_size > limit and event.output is not None and len(dumps(event.output)) > limit:
        raise PayloadTooLarge(
            f"the output is over MAX_OUTPUT_BYTES ({limit})", code="output_too_large"
        )
    unknown = [
        {"path": f"spawn.{i}.task", "type": "unknown_task", "message": f"no task {c.task!r}"}
        for i, c in enumerate(event.spawn)
        if c.task not in services.registry
    ]
    if unknown:
        raise ValidationFailed("the event names tasks this gateway does not know", details=unknown)


async def worker_event(request: Request) -> Response:
    services = _services(request)
    body = await signed_body(
        request, services.settings, services.settings.max_output_bytes + 64 * 1024
    )
    data = parse_json(body)
    if isinstance(data, dict) and data.get("type") == "delivery.attempt":
        report = validate(DeliveryAttemptReport, data)
        recorded = await services.webhooks.record_attempt(report)
        if recorded["recorded"]:
            # Wakes the dashboard's live feed; no run waits on a delivery.
            await services.notifier.publish(f"delivery:{report.delivery_id}")
        return JSONResponse(recorded)
    event = validate(WorkerEvent, data)
    _check_meaning(services, event, len(body))
    outcome = await services.runs.apply_event(event)
    return JSONResponse(outcome.to_dict())


class _PrepareRequest(BaseModel):
    delivery_id: str = Field(max_length=40)
    trigger: str = Field(default="schedule", pattern="^(schedule|resend)$")


async def prepare_delivery(request: Request) -> Response:
    services = _services(request)
    prepare = validate(_PrepareRequest, await _signed_json(request, services))
    return JSONResponse(await services.webhooks.prepare(prepare.delivery_id, prepare.trigger))


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
