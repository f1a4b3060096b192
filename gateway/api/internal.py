"""``/internal/v1``: what workers call on the gateway, every request signed.

A worker reports run events and callback attempts, asks for a delivery's
signed headers, and stores and reads artifacts. Each request's signature
covers its method, path, query and body (``jobs.protocol``); these routes are
not in the OpenAPI document, which is for applications.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pydantic import BaseModel, Field
from pydantic import ValidationError as PydanticValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.bodies import parse_json, signed_body, validate
from gateway.api.views import JSON
from gateway.errors import (
    APIError,
    BadRequest,
    PayloadTooLarge,
    ValidationFailed,
    validation_details,
)
from gateway.runs.durable import CHILD_OPTIONS_REFUSED
from gateway.runs.requests import Duration, Tag, TriggerOptions
from gateway.services import Services, services_of
from jobs import tracing
from jobs.protocol import (
    ARTIFACT_FETCH_PATH,
    ARTIFACTS_PATH,
    EVENTS_PATH,
    PREPARE_PATH,
    RUN_LOGS,
    WAITPOINTS_PATH,
    WORKERS_PATH,
    RunLogs,
    WorkerEvent,
    WorkerPresence,
    dumps,
)
from webhooks.models import DeliveryAttemptReport

__all__ = ["routes"]


def _check_meaning(services: Services, event: WorkerEvent, body_size: int) -> None:
    """What a signature cannot tell: an output within ``MAX_OUTPUT_BYTES``
    (413, so the worker ends the run with ``output_too_large``), children of
    known tasks. (A ``waiting`` event for a run that is not a workflow is
    refused where the run is read, in ``gateway.runs.workflow``.)"""
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
    details: list[dict[str, Any]] = []
    for i, child in enumerate(event.spawn):
        if child.options is None:
            continue  # a workflow's node: its payload is the planner's
        definition = services.registry.get(child.task)
        assert definition is not None
        details.extend(definition.payload_errors(child.payload, f"spawn.{i}.payload"))
        details.extend(
            {
                "path": f"spawn.{i}.options.{name}",
                "type": "not_allowed",
                "message": f"a durable task's child takes no {name}",
            }
            for name in CHILD_OPTIONS_REFUSED
            if name in child.options
        )
        try:
            TriggerOptions.model_validate(child.options)
        except PydanticValidationError as exc:
            details.extend(validation_details(exc, ("spawn", i, "options")))
    if details:
        raise ValidationFailed("the event's child runs do not fit their tasks", details=details)


async def _record(services: Services, report: DeliveryAttemptReport) -> dict[str, Any]:
    recorded = await services.dispatcher.record_attempt(report)
    if recorded["recorded"]:
        # Wakes the dashboard's live feed; no run waits on a delivery.
        await services.notifier.publish(f"delivery:{report.delivery_id}")
    return recorded


def _refusal(exc: APIError) -> dict[str, Any]:
    return {
        "status_code": exc.status_code,
        "error": {"code": exc.code, "message": exc.message, "details": exc.details},
    }


async def _apply_batch(services: Services, items: list[Any], body_size: int) -> list[Any]:
    """Each item's answer, in order: run events are applied together in one
    transaction, callback attempts recorded beside them; an item that is
    refused gets its error and the others go on."""
    answers: list[Any] = [None] * len(items)
    events: list[tuple[int, WorkerEvent]] = []
    attempts: list[tuple[int, DeliveryAttemptReport]] = []
    logs: list[tuple[int, RunLogs]] = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, dict) and item.get("type") == "delivery.attempt":
                attempts.append((index, validate(DeliveryAttemptReport, item)))
            elif isinstance(item, dict) and item.get("type") == RUN_LOGS:
                logs.append((index, validate(RunLogs, item)))
            else:
                event = validate(WorkerEvent, item)
                _check_meaning(services, event, body_size)
                events.append((index, event))
        except APIError as exc:
            answers[index] = _refusal(exc)
    if events:
        reports = [
            (
                f"report {event.type}",
                event.traceparent,
                {"gateway.run_id": event.run_id, "gateway.attempt": event.attempt},
            )
            for _, event in events
        ]
        with tracing.spans(reports) as spans:
            applied = await services.runs.apply_events([event for _, event in events])
            for (index, _), answer, span in zip(events, applied, spans, strict=True):
                if isinstance(answer, APIError):
                    answers[index] = _refusal(answer)
                    tracing.error(span, answer.code, answer.message)
                else:
                    answers[index] = answer.to_dict()
    if logs:
        kept = await services.runs.append_logs([batch for _, batch in logs])
        for (index, _), refused in zip(logs, kept, strict=True):
            answers[index] = _refusal(refused) if refused is not None else {"kept": True}
    if attempts:
        recorded = await services.dispatcher.record_attempts([report for _, report in attempts])
        for (index, report), outcome in zip(attempts, recorded, strict=True):
            if isinstance(outcome, APIError):
                answers[index] = _refusal(outcome)
                continue
            answers[index] = outcome
            if outcome["recorded"]:
                # Wakes the dashboard's live feed; no run waits on a delivery.
                await services.notifier.publish(f"delivery:{report.delivery_id}")
    return answers


async def worker_event(request: Request) -> Response:
    """Run events (started, completed, failed, waiting, heartbeat), callback
    attempts and run log lines, each applied once however often it is sent: one report, or a
    batch ``{"events": [...]}`` answered by ``{"answers": [...]}`` in order."""
    services = services_of(request)
    body = await signed_body(
        request, services.settings, services.settings.max_output_bytes + 64 * 1024
    )
    data = parse_json(body)
    if isinstance(data, dict) and isinstance(data.get("events"), list):
        return JSON({"answers": await _apply_batch(services, data["events"], len(body))})
    if isinstance(data, dict) and data.get("type") == "delivery.attempt":
        return JSON(await _record(services, validate(DeliveryAttemptReport, data)))
    event = validate(WorkerEvent, data)
    _check_meaning(services, event, len(body))
    with (
        tracing.span(
            f"report {event.type}",
            parent=event.traceparent,
            attributes={"gateway.run_id": event.run_id},
        )
        if event.traceparent
        else contextlib.nullcontext()
    ):
        answer = await services.runs.apply_event(event)
    return JSON(answer.to_dict())


class _PrepareRequest(BaseModel):
    delivery_id: str = Field(max_length=40)
    trigger: str = Field(default="schedule", pattern="^(schedule|resend)$")
    #: The job ran before (a worker died on it) or was queued again after it
    #: vanished: an attempt it sent may be out, unreported.
    retried: bool = False


async def prepare_delivery(request: Request) -> Response:
    """What to send for a delivery's attempt now, with headers signed afresh."""
    services = services_of(request)
    body = await signed_body(request, services.settings, 64 * 1024)
    prepare = validate(_PrepareRequest, parse_json(body))
    return JSON(
        await services.dispatcher.prepare(
            prepare.delivery_id, prepare.trigger, retried=prepare.retried
        )
    )


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest(f"{name} must be a whole number")
    return int(raw)


async def upload_artifact(request: Request) -> Response:
    """A worker stores an artifact (the body is the file)."""
    services = services_of(request)
    data = await signed_body(request, services.settings, services.settings.max_artifact_bytes)
    run_id = request.query_params.get("run_id")
    if not run_id:
        raise BadRequest("run_id is required")
    stored: dict[str, Any] = await services.artifacts.store(
        run_id,
        request.query_params.get("content_type", ""),
        data,
        _int_param(request, "width"),
        _int_param(request, "height"),
    )
    return JSON(stored, status_code=201)


async def fetch_artifact(request: Request) -> Response:
    """A worker reads an upstream artifact (the body is its ID): only one of
    the same project as the asking run."""
    services = services_of(request)
    store = services.artifacts
    artifact_id = (await signed_body(request, services.settings, 200)).decode("utf-8", "replace")
    project_id = await store.project_of_run(request.query_params.get("run_id", ""))
    row = await store.find(artifact_id.strip(), project_id)
    return await store.response(row)


class _WaitpointRequest(BaseModel):
    run_id: str = Field(max_length=40)
    #: The ``create_waitpoint`` step's key: one waitpoint per run and key.
    key: str = Field(min_length=1, max_length=200)
    timeout: Duration | None = Field(default=None, gt=0)
    tags: list[Tag] = Field(default_factory=list, max_length=10)


async def worker_presence(request: Request) -> Response:
    """A worker says it is there (``jobs.liveness.heartbeat``): kept for ``GET /api/v1/workers``."""
    services = services_of(request)
    body = await signed_body(request, services.settings, 1024 * 1024)
    await services.workers.record(validate(WorkerPresence, parse_json(body)))
    return JSON({"recorded": True})


async def create_waitpoint(request: Request) -> Response:
    """A durable task's waitpoint (``ctx.create_waitpoint``), made once per
    run and step however often the step asks; its ID and signed URL."""
    services = services_of(request)
    body = await signed_body(request, services.settings, 64 * 1024)
    asked = validate(_WaitpointRequest, parse_json(body))
    made = await services.waitpoints.create_run_waitpoint(
        asked.run_id, asked.key, asked.timeout, asked.tags
    )
    return JSON(made, status_code=201)


routes = [
    Route(EVENTS_PATH, worker_event, methods=["POST"]),
    Route(PREPARE_PATH, prepare_delivery, methods=["POST"]),
    Route(ARTIFACTS_PATH, upload_artifact, methods=["POST"]),
    Route(ARTIFACT_FETCH_PATH, fetch_artifact, methods=["POST"]),
    Route(WAITPOINTS_PATH, create_waitpoint, methods=["POST"]),
    Route(WORKERS_PATH, worker_presence, methods=["POST"]),
]
