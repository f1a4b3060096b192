"""SQLModel tables and the run status enum.

The Alembic migrations under ``db/migrations`` create exactly these tables;
``tests/test_migrations.py`` checks the two stay in step.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from db.types import JSONColumn, UTCDateTime, utcnow

__all__ = [
    "FINAL_STATUSES",
    "ApiKey",
    "Artifact",
    "Batch",
    "BulkAction",
    "DashboardSession",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryStatus",
    "EndpointSecret",
    "IdempotencyKey",
    "Project",
    "Queue",
    "Run",
    "RunAttempt",
    "RunLog",
    "RunNode",
    "RunStatus",
    "RunTransition",
    "Schedule",
    "Waitpoint",
    "WebhookEndpoint",
]


class RunStatus(enum.StrEnum):
    """Where a run is in its life. See docs/architecture.md, "Run statuses"."""

    DELAYED = "DELAYED"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    RETRYING = "RETRYING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.CANCELED,
        RunStatus.EXPIRED,
        RunStatus.TIMED_OUT,
    }
)


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(
        default=None,
        sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index),
    )


class Project(SQLModel, table=True):
    __tablename__ = "projects"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200, sa_column_kwargs={"unique": True}, nullable=False)
    #: ``whsec_…``: signs the one-off ``options.callback_url`` deliveries of its runs.
    signing_secret: str | None = Field(default=None, max_length=100)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )


class ApiKey(SQLModel, table=True):
    """A secret API key; only the SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", index=True, max_length=40)
    key_hash: str = Field(max_length=64, sa_column_kwargs={"unique": True}, nullable=False)
    #: The first characters of the key, to tell keys apart in listings.
    prefix: str = Field(max_length=20)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    revoked_at: dt.datetime | None = _ts()
    #: Requests per second this key may make (a token bucket); ``None``: the default.
    rate_limit: float | None = None
    rate_burst: int | None = None


class DashboardSession(SQLModel, table=True):
    """A dashboard sign-in. The cookie names it; signing out ends it here, so
    a copy of the cookie is worth nothing afterwards."""

    __tablename__ = "dashboard_sessions"

    id: str = Field(primary_key=True, max_length=64)
    key_id: str = Field(foreign_key="api_keys.id", index=True, max_length=40)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    expires_at: dt.datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    ended_at: dt.datetime | None = _ts()


def _filled(column: str) -> dict[str, Any]:
    """An index's options that keep out the rows where ``column`` is NULL."""
    where = sa.text(f"{column} IS NOT NULL")
    return {"sqlite_where": where, "postgresql_where": where}


class Run(SQLModel, table=True):
    __tablename__ = "runs"
    __table_args__ = (
        sa.Index("ix_runs_project_created", "project_id", "created_at"),
        # The dashboard's counts per status.
        sa.Index("ix_runs_project_status", "project_id", "status"),
        sa.Index("ix_runs_status_updated", "status", "updated_at"),
        # Partial: most runs have no run_at, expire_at, schedule, replay
        # source, batch or parent, and each index they are not in is one
        # write fewer per status move (migration 0016).
        sa.Index("ix_runs_status_run_at", "status", "run_at", **_filled("run_at")),
        sa.Index("ix_runs_status_expire_at", "status", "expire_at", **_filled("expire_at")),
        sa.Index("ix_runs_status_heartbeat", "status", "heartbeat_at"),
        # Flow control: a queue's runs by status, the held ones in start order.
        sa.Index("ix_runs_queue", "project_id", "queue", "status", "held", "order_at"),
        # One run per schedule tick, however many gateways fire it.
        sa.Index(
            "ix_runs_schedule_tick",
            "schedule_id",
            "scheduled_at",
            unique=True,
            **_filled("schedule_id"),
        ),
        sa.Index("ix_runs_replayed_from", "replayed_from", **_filled("replayed_from")),
        sa.Index("ix_runs_batch_id", "batch_id", **_filled("batch_id")),
        sa.Index("ix_runs_parent_id", "parent_id", **_filled("parent_id")),
        # One DELAYED run per debounce key (docs/architecture.md, "Flow control").
        sa.Index(
            "ix_runs_debounce",
            "project_id",
            "task",
            "debounce_key",
            unique=True,
            sqlite_where=sa.text("status = 'DELAYED' AND debounce_key IS NOT NULL"),
            postgresql_where=sa.text("status = 'DELAYED' AND debounce_key IS NOT NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    task: str = Field(max_length=200)
    status: str = Field(max_length=16)
    #: The number of the current (or last) attempt, from 1.
    attempt: int = Field(default=1)
    payload: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))
    output: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))
    error_code: str | None = Field(default=None, max_length=100)
    error_message: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    tags: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONColumn, nullable=False))
    # ``metadata`` is taken by SQLAlchemy's declarative base, hence the name.
    meta: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column("metadata", JSONColumn, nullable=False)
    )
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    started_at: dt.datetime | None = _ts()
    finished_at: dt.datetime | None = _ts()
    #: The last sign of life from the worker running the attempt.
    heartbeat_at: dt.datetime | None = _ts()
    #: When a DELAYED or RETRYING run is due.
    run_at: dt.datetime | None = _ts()
    #: A run not started by then ends EXPIRED (``options.ttl``).
    expire_at: dt.datetime | None = _ts()
    max_attempts: int = Field(default=3)
    #: Backoff between attempts: factor, min_delay, max_delay, jitter.
    retry: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))
    #: Seconds an attempt may run before the run ends TIMED_OUT.
    max_duration: float | None = None
    idempotency_key: str | None = Field(default=None, max_length=200)
    replayed_from: str | None = Field(default=None, max_length=40)
    batch_id: str | None = Field(default=None, max_length=40)
    #: A one-off callback for this run (``options.callback_url``).
    callback_url: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    #: For a workflow's node: the workflow run, and the node's ID in its graph.
    parent_id: str | None = Field(default=None, max_length=40)
    node_id: str | None = Field(default=None, max_length=200)
    #: For a workflow: the number of its current step (each step is one job).
    step: int = Field(default=0)
    #: A child ended while a step was in flight: run one more step after it.
    step_pending: bool = Field(default=False)
    #: The queue whose limit the run's starts obey (the task's own by default).
    queue: str = Field(
        default="", sa_column=sa.Column(sa.String(100), nullable=False, server_default="")
    )
    #: The queue's limit applies to each key apart (a tenant, a customer).
    concurrency_key: str | None = Field(default=None, max_length=200)
    #: Seconds of head start: ordered as if triggered this much earlier.
    priority: int = Field(
        default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0")
    )
    #: ``created_at`` less ``priority``: the order in which held runs start.
    order_at: dt.datetime | None = _ts()
    #: The run's starts go through its queue's limit (the queue had one, or
    #: was paused, when the run was queued); a gated run ending frees a slot.
    gated: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    #: QUEUED, and held in the database until its queue has room: not in Redis.
    held: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    #: Triggers with this key while the run is DELAYED push its start back.
    debounce_key: str | None = Field(default=None, max_length=200)
    #: A debounced run starts by then at the latest (``debounce.max_delay``).
    debounce_until: dt.datetime | None = _ts()
    #: The schedule whose tick made the run, and the tick.
    schedule_id: str | None = Field(default=None, max_length=40)
    scheduled_at: dt.datetime | None = _ts()
    #: The W3C ``traceparent`` of the span that made the run: every span of the
    #: run (attempts, reports, callbacks) is in its trace (``jobs.tracing``).
    traceparent: str | None = Field(default=None, max_length=64)


class RunAttempt(SQLModel, table=True):
    """One execution attempt of a run."""

    __tablename__ = "run_attempts"
    __table_args__ = (sa.UniqueConstraint("run_id", "number", name="uq_run_attempts_run_number"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id", max_length=40)
    number: int
    status: str = Field(max_length=16)
    worker_id: str | None = Field(default=None, max_length=200)
    started_at: dt.datetime | None = _ts()
    finished_at: dt.datetime | None = _ts()
    error_code: str | None = Field(default=None, max_length=100)
    error_message: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))


class RunTransition(SQLModel, table=True):
    """Every status change a run went through, in order (an audit log)."""

    __tablename__ = "run_transitions"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id", index=True, max_length=40)
    from_status: str | None = Field(default=None, max_length=16)
    to_status: str = Field(max_length=16)
    attempt: int
    at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )


class RunLog(SQLModel, table=True):
    """A line a task logged (``ctx.logger``), kept with its run and attempt, in
    the order it came; ``kind`` is ``line``, or ``dropped`` for the one line
    that counts what ``RUN_LOG_MAX_LINES`` turned away."""

    __tablename__ = "run_logs"
    __table_args__ = (sa.Index("ix_run_logs_run", "run_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id", max_length=40)
    attempt: int
    #: Chosen by the worker (a batch's ID and the line's place in it), so a
    #: batch sent twice is kept once.
    key: str = Field(max_length=64, sa_column_kwargs={"unique": True}, nullable=False)
    kind: str = Field(default="line", max_length=16)
    ts: dt.datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))
    level: str = Field(max_length=16)
    message: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    fields: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookEndpoint(SQLModel, table=True):
    """A URL a project registered to be called when its runs change."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (sa.Index("ix_webhook_endpoints_project", "project_id", "created_at"),)

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    url: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    description: str = Field(default="", sa_column=sa.Column(sa.Text, nullable=False))
    events: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONColumn, nullable=False))
    #: Only runs of these tasks; empty means every task.
    tasks: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONColumn, nullable=False))
    enabled: bool = Field(default=True)
    disabled_reason: str | None = Field(default=None, max_length=200)
    disabled_at: dt.datetime | None = _ts()
    #: When the current run of failures began; cleared by a success.
    failing_since: dt.datetime | None = _ts()
    last_success_at: dt.datetime | None = _ts()
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    deleted_at: dt.datetime | None = _ts()


class EndpointSecret(SQLModel, table=True):
    """A signing secret of an endpoint; a rotated-out one lives until ``expires_at``."""

    __tablename__ = "endpoint_secrets"

    id: int | None = Field(default=None, primary_key=True)
    endpoint_id: str = Field(foreign_key="webhook_endpoints.id", index=True, max_length=40)
    secret: str = Field(max_length=100)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    expires_at: dt.datetime | None = _ts()


class Delivery(SQLModel, table=True):
    """One message (one event for one URL); its ID is the ``webhook-id`` header."""

    __tablename__ = "deliveries"
    __table_args__ = (
        sa.Index("ix_deliveries_endpoint_created", "endpoint_id", "created_at"),
        sa.Index("ix_deliveries_run", "run_id"),
        sa.Index("ix_deliveries_status_next", "status", "next_attempt_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    #: ``None`` for a run's one-off ``callback_url``.
    endpoint_id: str | None = Field(default=None, foreign_key="webhook_endpoints.id", max_length=40)
    run_id: str | None = Field(default=None, foreign_key="runs.id", max_length=40)
    url: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    event_type: str = Field(max_length=40)
    payload: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=False))
    status: str = Field(max_length=16)
    attempts: int = Field(default=0)
    #: How many scheduled attempts were made: the position in the retry schedule.
    schedule_step: int = Field(default=0)
    next_attempt_at: dt.datetime | None = _ts()
    #: When the attempt now out was handed to a worker; cleared once it is
    #: reported. A try unreported ``WEBHOOK_TIMEOUT`` + ``RECONCILE_GRACE``
    #: later is recorded as ``attempt_lost``, so every try ends as an attempt.
    leased_at: dt.datetime | None = _ts()
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    delivered_at: dt.datetime | None = _ts()


class DeliveryAttempt(SQLModel, table=True):
    """One try at sending a delivery, as the receiver answered it."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (
        sa.UniqueConstraint("delivery_id", "number", name="uq_delivery_attempts_number"),
    )

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(foreign_key="deliveries.id", max_length=40)
    #: Chosen by the sender, so a report sent twice is recorded once.
    key: str = Field(max_length=64, sa_column_kwargs={"unique": True}, nullable=False)
    number: int
    #: ``schedule`` or ``resend``.
    trigger: str = Field(max_length=16)
    at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    succeeded: bool
    status_code: int | None = None
    latency_ms: int | None = None
    #: The first 2 KiB of the answer's body.
    response_body: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    #: A connection error, a timeout or a refused address, when there was no answer.
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    #: Why there was no answer, as a code (``timeout``, ``connection_error``, ...).
    error_code: str | None = Field(default=None, max_length=40)


class RunNode(SQLModel, table=True):
    """One node of a workflow run's graph, or one step of a durable task, as far as
    the run has got."""

    __tablename__ = "run_nodes"
    __table_args__ = (sa.UniqueConstraint("parent_id", "node_id", name="uq_run_nodes_node"),)

    id: int | None = Field(default=None, primary_key=True)
    parent_id: str = Field(foreign_key="runs.id", max_length=40)
    node_id: str = Field(max_length=200)
    #: ``running`` (its child run is not final), ``waiting`` (on its
    #: waitpoint), ``completed``, ``failed``, ``canceled`` or ``skipped``.
    status: str = Field(max_length=16)
    run_id: str | None = Field(default=None, max_length=40)
    #: A ``wait`` or ``delay`` node's waitpoint (a ``sleep`` or ``token`` step's).
    waitpoint_id: str | None = Field(default=None, max_length=40)
    output: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))
    error_code: str | None = Field(default=None, max_length=100)
    error_message: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    #: A durable task's step (``node_id`` is its key): ``step``, ``child``,
    #: ``batch``, ``sleep``, ``waitpoint`` or ``token``; ``None`` for a
    #: workflow's node and a batch's child.
    kind: str | None = Field(default=None, max_length=16)
    #: Its place in the task's sequence of steps (0, 1, …), checked on every
    #: execution (``nondeterministic_step``).
    position: int | None = None
    started_at: dt.datetime | None = Field(
        default=None, sa_column=sa.Column(UTCDateTime(), nullable=True)
    )
    finished_at: dt.datetime | None = Field(
        default=None, sa_column=sa.Column(UTCDateTime(), nullable=True)
    )


class Artifact(SQLModel, table=True):
    """A file a task produced (a cropped image), kept under ``ARTIFACT_DIR``."""

    __tablename__ = "artifacts"

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    run_id: str | None = Field(default=None, foreign_key="runs.id", max_length=40, index=True)
    content_type: str = Field(max_length=100)
    bytes: int
    sha256: str = Field(max_length=64)
    width: int | None = None
    height: int | None = None
    #: Where the bytes are: ``local`` (a file under ``ARTIFACT_DIR``, at
    #: ``path``) or ``database`` (a row of ``artifact_blobs``).
    storage: str = Field(
        default="local",
        sa_column=sa.Column(sa.String(16), nullable=False, server_default="local"),
    )
    #: Relative to ``ARTIFACT_DIR`` (a local file's), or its name.
    path: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )


class ArtifactBlob(SQLModel, table=True):
    """The bytes of an artifact kept in the database (``ARTIFACT_STORE=database``),
    apart from its row so listings never read them."""

    __tablename__ = "artifact_blobs"

    artifact_id: str = Field(
        sa_column=sa.Column(
            sa.String(40), sa.ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True
        )
    )
    data: bytes = Field(sa_column=sa.Column(sa.LargeBinary, nullable=False))


class IdempotencyKey(SQLModel, table=True):
    """A trigger's idempotency key, scoped to the project and task, until it expires."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        sa.UniqueConstraint("project_id", "task", "key", name="uq_idempotency_keys_scope"),
    )

    id: int | None = Field(default=None, primary_key=True)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    task: str = Field(max_length=200)
    key: str = Field(max_length=200)
    run_id: str = Field(foreign_key="runs.id", max_length=40)
    expires_at: dt.datetime = Field(sa_column=sa.Column(UTCDateTime(), nullable=False))


class Queue(SQLModel, table=True):
    """A named queue of a project: how many of its runs may execute at once,
    and whether it is paused. A queue nobody configured has no row and no limit."""

    __tablename__ = "queues"
    __table_args__ = (sa.UniqueConstraint("project_id", "name", name="uq_queues_project_name"),)

    id: int | None = Field(default=None, primary_key=True)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    name: str = Field(max_length=100)
    #: ``None``: no limit.
    concurrency_limit: int | None = None
    paused: bool = Field(default=False)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )


class Schedule(SQLModel, table=True):
    """Runs of a task on a clock: a cron expression in a time zone."""

    __tablename__ = "schedules"
    __table_args__ = (
        sa.Index("ix_schedules_project_created", "project_id", "created_at"),
        sa.Index("ix_schedules_enabled_next", "enabled", "next_run_at"),
        sa.UniqueConstraint(
            "project_id", "deduplication_key", name="uq_schedules_deduplication_key"
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    task: str = Field(max_length=200)
    cron: str = Field(max_length=200)
    timezone: str = Field(max_length=64)
    payload: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))
    #: The trigger options each run gets.
    options: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(JSONColumn, nullable=False)
    )
    enabled: bool = Field(default=True)
    #: The next tick (``None`` while disabled).
    next_run_at: dt.datetime | None = _ts()
    last_run_at: dt.datetime | None = _ts()
    last_run_id: str | None = Field(default=None, max_length=40)
    #: The caller's own name for what the schedule is for (a user's ID).
    external_id: str | None = Field(default=None, max_length=200)
    #: The same key (per project) updates this schedule instead of making another.
    deduplication_key: str | None = Field(default=None, max_length=200)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )


class Waitpoint(SQLModel, table=True):
    """Something a run waits for outside it: a person's approval, a third
    party's callback, or (a ``delay`` node) a time."""

    __tablename__ = "waitpoints"
    __table_args__ = (
        sa.UniqueConstraint("project_id", "idempotency_key", name="uq_waitpoints_key"),
        sa.Index("ix_waitpoints_status_timeout", "status", "timeout_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    #: ``WAITING``, ``COMPLETED`` or ``TIMED_OUT``.
    status: str = Field(max_length=16)
    #: ``manual`` (completed by a POST) or ``delay`` (completed by the clock).
    kind: str = Field(default="manual", max_length=16)
    output: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))
    idempotency_key: str | None = Field(default=None, max_length=200)
    tags: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONColumn, nullable=False))
    #: A ``manual`` one times out then; a ``delay`` one completes then.
    timeout_at: dt.datetime | None = _ts()
    #: The workflow run and node that wait on it.
    run_id: str | None = Field(default=None, max_length=40, index=True)
    node_id: str | None = Field(default=None, max_length=200)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    completed_at: dt.datetime | None = _ts()


class BulkAction(SQLModel, table=True):
    """A cancel or replay of many runs, done in pages; ``cursor`` is the last
    run done, so a page that runs twice does nothing twice."""

    __tablename__ = "bulk_actions"
    __table_args__ = (sa.Index("ix_bulk_actions_status_updated", "status", "updated_at"),)

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    #: ``cancel`` or ``replay``.
    action: str = Field(max_length=16)
    #: ``{"filter": {...}}`` or ``{"ids": [...]}``.
    selection: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=False))
    #: ``running`` or ``completed``.
    status: str = Field(max_length=16)
    #: The runs selected when the action was made.
    count: int
    processed: int = Field(default=0)
    succeeded: int = Field(default=0)
    #: Runs it left as they were (already final, for a cancel).
    skipped: int = Field(default=0)
    cursor: str | None = Field(default=None, max_length=40)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    finished_at: dt.datetime | None = _ts()


class Batch(SQLModel, table=True):
    __tablename__ = "batches"

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    count: int
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
