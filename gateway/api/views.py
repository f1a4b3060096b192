"""Pydantic models of what the API answers, and ``shaped()`` that answers with them.

The OpenAPI document (``gateway.api.openapi``) is generated from these and from the
request models in ``gateway.runs.requests``, so what is documented is what is sent.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from gateway.runs.requests import Status

__all__ = [
    "JSON",
    "AttemptView",
    "BatchCreated",
    "BatchSummary",
    "BulkCreated",
    "BulkView",
    "DeliveryPage",
    "DeliveryView",
    "EndpointCreated",
    "EndpointList",
    "EndpointSecretView",
    "EndpointView",
    "ErrorBody",
    "QueueList",
    "QueueView",
    "RecoverAnswer",
    "RotatedSecret",
    "RunLogPage",
    "RunPage",
    "RunView",
    "ScheduleList",
    "ScheduleView",
    "SigningSecret",
    "TaskList",
    "WaitpointView",
    "shaped",
]

M = TypeVar("M", bound=BaseModel)


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    path: str | None = None
    message: str | None = None
    type: str | None = None


class ErrorInfo(_View):
    code: str
    message: str
    details: list[ErrorDetail]


class ErrorBody(_View):
    """Every error answer."""

    error: ErrorInfo


class RunError(_View):
    code: str
    message: str


class AttemptView(_View):
    number: int
    status: Status
    worker_id: str | None
    started_at: str | None
    finished_at: str | None
    error: RunError | None


class NodeWaitpoint(_View):
    id: str
    #: POST any JSON here (no API key) to complete the node with it.
    url: str | None = None


class NodeView(_View):
    type: str | None
    status: str
    run_id: str | None
    output: Any
    error: RunError | None
    #: A ``wait`` or ``delay`` node that is WAITING: its waitpoint.
    waitpoint: NodeWaitpoint | None = None


class StepView(_View):
    """A durable task's step (``ctx.step``, ``ctx.trigger_and_wait``, ``ctx.sleep``…)."""

    #: Its key: the name the code gave it (``name:2`` for the second of that name).
    name: str
    kind: Literal["step", "child", "batch", "sleep", "waitpoint", "token"]
    #: ``COMPLETED``, ``FAILED``, ``RUNNING`` (its children), ``WAITING`` (its
    #: waitpoint) or ``CANCELED``.
    status: str
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    #: Its kept result: what the step returned, a child's output, the body
    #: posted to a token's waitpoint.
    output: Any
    error: RunError | None
    #: ``child`` and ``batch``: the child runs, in the order they were asked for.
    runs: list[str] | None = None
    #: ``sleep`` and ``token``: the waitpoint it waits on.
    waitpoint: str | None = None


class WaitingFor(_View):
    kind: Literal[
        "delay",
        "debounce",
        "retry",
        "children",
        "waitpoint",
        "sleep",
        "token",
        "worker",
        "paused",
        "queue_concurrency",
        "concurrency_key",
    ]
    until: str | None = None
    queue: str | None = None
    key: str | None = None
    running: int | None = None
    limit: int | None = None
    #: ``waitpoint``: the workflow's node that waits, and its waitpoint.
    node: str | None = None
    waitpoint: str | None = None
    #: A durable task: the step its code waits at (``children``, ``sleep``,
    #: ``token``), and the child runs it waits for.
    step: str | None = None
    runs: list[str] | None = None


class RunView(_View):
    """A run, as ``GET /api/v1/runs/{id}`` shows it."""

    id: str
    task: str
    status: Status
    is_final: bool
    payload: Any
    output: Any
    error: RunError | None
    attempt: int
    attempts: list[AttemptView]
    tags: list[str]
    metadata: dict[str, Any]
    parent_id: str | None
    node_id: str | None
    #: The run this one replays (``POST /api/v1/runs/{id}/replay``).
    replayed_from: str | None = None
    #: The queue whose limit its starts obey, the key the limit applies to
    #: apart, and its head start in seconds.
    queue: str | None = None
    concurrency_key: str | None = None
    priority: int = 0
    #: Why a run that has not started waits (one run's page only): ``delay``,
    #: ``debounce``, ``retry`` (with ``until``), ``queue_concurrency``,
    #: ``concurrency_key`` (with ``queue``, ``running``, ``limit``), ``paused``,
    #: ``children`` (a workflow, or a durable task with ``step`` and
    #: ``runs``), ``waitpoint`` (a workflow's wait or delay node, with
    #: ``node`` and ``waitpoint``), ``sleep`` and ``token`` (a durable task's,
    #: with ``step``, ``waitpoint`` and ``until``), ``worker`` (handed to arq,
    #: not yet started).
    waiting_for: WaitingFor | None = None
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    #: Workflows only: every node of the graph.
    nodes: dict[str, NodeView] | None = None
    #: Every other task (one run's page only): its durable steps, in order.
    steps: list[StepView] | None = None
    #: The schedule whose tick made the run, and the tick.
    schedule_id: str | None = None
    scheduled_at: str | None = None
    #: The OpenTelemetry trace of the run (32 hex digits), when traces are on.
    trace_id: str | None = None
    #: Trigger answers only: an earlier run given back for its idempotency
    #: key, or a DELAYED run that a debounce key pushed back.
    is_cached: bool | None = None
    debounced: bool | None = None
    public_access_token: str | None = None


class RunPage(_View):
    data: list[RunView]
    next_cursor: str | None


class RunLogLine(_View):
    #: Its place in the run's log (a page's cursor).
    id: int
    ts: str
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    message: str
    attempt: int
    #: What the task gave as ``extra``; ``{"dropped": n}`` on the line that
    #: counts what ``RUN_LOG_MAX_LINES`` turned away.
    fields: dict[str, Any]


class RunLogPage(_View):
    data: list[RunLogLine]
    next_cursor: str | None


class BatchCreated(_View):
    batch_id: str
    runs: list[RunView]


class BatchSummary(_View):
    id: str
    count: int
    counts: dict[str, int]
    is_final: bool
    created_at: str
    run_ids: list[str]


class TaskInfo(_View):
    name: str
    description: str
    payload_schema: dict[str, Any]
    #: What it returns (``{}``: any JSON), from ``@task(output=...)``.
    output_schema: dict[str, Any]
    #: The queue its runs go to by default, and the limit the task declares.
    queue: str
    concurrency_limit: int | None


class TaskList(_View):
    data: list[TaskInfo]


class EndpointView(_View):
    id: str
    url: str
    description: str
    events: list[str]
    tasks: list[str]
    enabled: bool
    disabled_reason: str | None
    disabled_at: str | None
    failing_since: str | None
    last_success_at: str | None
    created_at: str
    updated_at: str


class EndpointCreated(EndpointView):
    secret: str = Field(description="whsec_ + base64; shown here and by GET …/secret")


class EndpointList(_View):
    data: list[EndpointView]


class PreviousSecret(_View):
    secret: str
    expires_at: str | None


class EndpointSecretView(_View):
    secret: str
    previous: list[PreviousSecret]


class RotatedSecret(_View):
    secret: str
    previous_expires_at: str | None


class SigningSecret(_View):
    secret: str


class DeliveryAttemptView(_View):
    number: int
    trigger: str
    at: str | None
    succeeded: bool
    status_code: int | None
    latency_ms: int | None
    response_body: str | None
    error: str | None
    #: Why there was no answer: timeout, connection_error, address_refused,
    #: send_failed, attempt_lost (never reported), record_failed.
    error_code: str | None


class DeliveryView(_View):
    id: str
    event_type: str
    endpoint_id: str | None
    run_id: str | None
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempt_count: int
    next_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    created_at: str | None
    delivered_at: str | None
    payload: Any
    attempts: list[DeliveryAttemptView]


class DeliveryPage(_View):
    data: list[DeliveryView]
    next_cursor: str | None


class RecoverAnswer(_View):
    count: int
    #: Every message sent again: ``failed`` (pending again now) and
    #: ``pending`` (sent now, beside the retry they were waiting for).
    delivery_ids: list[str]
    failed: list[str]
    pending: list[str]


class Health(_View):
    status: str
    checks: dict[str, str] | None = None


class QueueView(_View):
    name: str
    #: How many of its runs may execute at once, per concurrency key
    #: (``None``: no limit).
    concurrency_limit: int | None
    paused: bool
    #: Its runs that are QUEUED (waiting for a slot, or handed to a worker)
    #: and EXECUTING.
    queued: int
    running: int
    #: ``None`` for a queue nobody configured (a task's own).
    created_at: str | None
    updated_at: str | None


class QueueList(_View):
    data: list[QueueView]
    #: The next page's ``cursor`` (a queue's name), or ``null`` on the last.
    next_cursor: str | None


class WorkerView(_View):
    """A worker process, as it last said of itself (``gateway.workers``)."""

    #: ``host:pid``: the ``worker_id`` its runs' attempts carry.
    id: str
    host: str
    pid: int
    #: The gateway package's version it runs.
    version: str
    #: The arq queue it takes runs from.
    queue: str
    #: The tasks it can run.
    tasks: list[str]
    #: Runs it runs at once at most (``WORKER_CONCURRENCY``), and those in use.
    slots: int
    slots_in_use: int
    #: ``online`` (heard from within ``HEARTBEAT_TIMEOUT``), ``lost`` (silent
    #: longer: its runs end ``worker_lost`` and run again) or ``stopped``.
    status: Literal["online", "lost", "stopped"]
    started_at: str
    last_heartbeat_at: str
    #: The runs of your project it holds an attempt of.
    runs: list[str]


class WorkerList(_View):
    data: list[WorkerView]


class BulkView(_View):
    """A bulk action and how far it has got."""

    id: str
    action: Literal["cancel", "replay"]
    status: Literal["running", "completed"]
    selection: dict[str, Any]
    #: The runs it selects: those committed when it was made, while it runs;
    #: once completed, exactly the runs it went through.
    count: int
    processed: int
    #: Runs canceled, or replays made.
    succeeded: int
    #: Runs it left as they were (final already, for a cancel).
    skipped: int
    is_final: bool
    created_at: str
    updated_at: str
    finished_at: str | None


class BulkCreated(BulkView):
    bulk_id: str


class ScheduleView(_View):
    id: str
    task: str
    cron: str
    timezone: str
    payload: Any
    #: Each run's trigger options.
    options: dict[str, Any]
    enabled: bool
    #: The next tick (``None`` while disabled), the last one and its run.
    next_run_at: str | None
    last_run_at: str | None
    last_run_id: str | None
    #: Your own name for what it is for, and the key that deduplicates it.
    external_id: str | None
    deduplication_key: str | None
    created_at: str
    updated_at: str


class RunTags(_View):
    tags: list[str]


class RunMetadata(_View):
    metadata: dict[str, Any]


class ScheduleList(_View):
    data: list[ScheduleView]


class WaitpointList(_View):
    data: list[WaitpointView]
    #: The next page's ``cursor``, or ``null`` on the last.
    next_cursor: str | None


class WaitpointView(_View):
    id: str
    #: ``CANCELED``: the run that waited on it was canceled.
    status: Literal["WAITING", "COMPLETED", "TIMED_OUT", "CANCELED"]
    #: ``manual`` (completed by a POST) or ``delay`` (a workflow's delay node).
    kind: str
    #: What completed it: the posted body.
    output: Any
    tags: list[str]
    idempotency_key: str | None
    #: The workflow run and node that wait on it.
    run_id: str | None
    node_id: str | None
    #: While WAITING: POST any JSON here, with no API key, to complete it.
    url: str | None
    #: When it times out (a delay: when it completes).
    expires_at: str | None
    created_at: str
    completed_at: str | None
    #: Create answers only: an earlier one given back for its idempotency key.
    is_cached: bool | None = None


class ArtifactLink(_View):
    artifact_id: str
    url: str
    content_type: str
    bytes: int
    sha256: str
    width: int | None
    height: int | None
    run_id: str | None


class RunEventBody(_View):
    """A callback about a run (Standard Webhooks: ``webhook-id``,
    ``webhook-timestamp`` and ``webhook-signature`` headers sign it)."""

    type: Literal[
        "run.started", "run.completed", "run.failed", "run.canceled", "run.expired", "run.timed_out"
    ]
    #: When the event happened (ISO 8601, UTC).
    timestamp: str
    #: The run as ``GET /api/v1/runs/{id}`` shows it at that moment.
    data: RunView


class WaitpointEventBody(_View):
    """A callback about a waitpoint that completed."""

    type: Literal["waitpoint.completed"]
    timestamp: str
    data: WaitpointView


class TestEventData(_View):
    endpoint_id: str
    message: str


class TestEventBody(_View):
    """What ``POST /api/v1/webhooks/{id}/test`` sends."""

    type: Literal["webhook.test"]
    timestamp: str
    data: TestEventData


class EventType(_View):
    """One kind of callback (as Svix's event-type catalogue has them)."""

    name: str
    description: str
    #: Whether an endpoint subscribed to ``*`` gets it (``run.started`` must
    #: be named; ``webhook.test`` goes to the endpoint tested alone).
    in_wildcard: bool
    #: The JSON Schema of the body.
    schema_: dict[str, Any] = Field(alias="schema", serialization_alias="schema")


class EventTypeList(_View):
    data: list[EventType]


class JSON(JSONResponse):
    """A JSON answer, encoded by orjson (the standard library for what orjson
    has no form for, such as an integer past 64 bits)."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:
            return super().render(content)


def shaped(
    model: type[M], data: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Answer ``data``, which is of the shape of ``model`` (the document says so)."""
    return JSON(data, status_code=status_code, headers=headers)
