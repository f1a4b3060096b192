"""The HTTP routes of the public API, the worker events and the health checks."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.bodies import json_object, parse_json, read_body, validate
from gateway.errors import (
    NotFound,
    Unauthorized,
    ValidationFailed,
    error_response,
)
from gateway.schemas import TriggerRequest, WorkerEvent
from gateway.services import Services
from gateway.webhooks import DeliveryAttemptReport
from jobs.report import EVENTS_PATH, PREPARE_PATH
from webhooks.signing import EVENT_SIGNATURE_HEADER, EventSignatureError, verify_event_body

__all__ = ["routes"]

MAX_WAIT_SECONDS = 60

M = TypeVar("M", bound=BaseModel)


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def trigger(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    task_name = request.path_params["task"]
    definition = services.registry.get(task_name)
    if definition is None:
        raise NotFound(
            f"no task named {task_name!r}; known tasks: {', '.join(services.registry.names())}",
            code="task_not_found",
        )
    trigger_request = await json_object(request, services.settings.max_body_bytes, TriggerRequest)
    payload_errors = definition.payload_errors(trigger_request.payload)
    if payload_errors:
        raise ValidationFailed(
            f"the payload does not fit task {task_name!r}",
            code="invalid_payload",
            details=[
                {**d, "path": "payload" + (f".{d['path']}" if d["path"] else "")}
                for d in payload_errors
            ],
        )
    run = await services.runs.trigger(principal.project_id, task_name, trigger_request)
    return JSONResponse(run, status_code=202, headers={"location": f"/api/v1/runs/{run['id']}"})


def _wait_seconds(request: Request) -> float | None:
    raw = request.query_params.get("wait")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise ValidationFailed(
            f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS}",
            details=[{"path": "query.wait", "message": f"got {raw!r}", "type": "value_error"}],
        )
    return value


async def get_run(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    run_id = request.path_params["run_id"]
    wait = _wait_seconds(request)
    if wait:
        run = await services.runs.wait(principal.project_id, run_id, wait)
    else:
        run = await services.runs.get(principal.project_id, run_id)
    return JSONResponse(run)


async def cancel_run(request: Request) -> Response:
    services = _services(request)
    principal = await services.auth.authenticate(request)
    run = await services.runs.cancel(principal.project_id, request.path_params["run_id"])
    return JSONResponse(run)


async def list_tasks(request: Request) -> Response:
    services = _services(request)
    await services.auth.authenticate(request)
    tasks = []
    for name in services.registry.names():
        definition = services.registry.get(name)
        assert definition is not None
        schema = definition.payload_model.model_json_schema() if definition.payload_model else {}
        tasks.append(
            {"name": name, "description": definition.description, "payload_schema": schema}
        )
    return JSONResponse({"data": tasks})


async def _signed_json(request: Request, services: Services) -> Any:
    """The body of a worker's call, once its signature checks out (else 401)."""
    settings = services.settings
    body = await read_body(request, settings.max_output_bytes + 64 * 1024)
    try:
        verify_event_body(
            body,
            request.headers.get(EVENT_SIGNATURE_HEADER),
            settings.secret_key,
            max_age=settings.event_max_age,
        )
    except EventSignatureError as exc:
        raise Unauthorized(exc.message, code=exc.code) from None
    return parse_json(body)


async def worker_event(request: Request) -> Response:
    services = _services(request)
    data = await _signed_json(request, services)
    if isinstance(data, dict) and data.get("type") == "delivery.attempt":
        report = validate(DeliveryAttemptReport, data)
        return JSONResponse(await services.webhooks.record_attempt(report))
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
    Route("/api/v1/tasks/{task}/trigger", trigger, methods=["POST"]),
    Route("/api/v1/runs/{run_id}", get_run, methods=["GET"]),
    Route("/api/v1/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
    Route(EVENTS_PATH, worker_event, methods=["POST"]),
    Route(PREPARE_PATH, prepare_delivery, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
