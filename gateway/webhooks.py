"""Callbacks: endpoints, the outbox of deliveries, and each delivery's attempts.

A delivery (one event for one URL; its ID is the ``webhook-id`` header) is
written in the same transaction as the run transition that causes it
(DESIGN.md, invariant 4). After the commit the gateway puts a
``deliver_webhook`` job on the queue; a worker sends the call and reports the
attempt back as a signed event; the gateway records it and, on failure,
queues the next try on the retry schedule. The gateway keeps the secrets: a
worker gets freshly signed headers for each attempt (``prepare``), never a key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import sqlalchemy as sa
from arq import ArqRedis
from arq.constants import abort_jobs_ss
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from redis.exceptions import RedisError

from db.engine import Database
from db.ids import new_id
from db.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    EndpointSecret,
    Project,
    Run,
    RunStatus,
    WebhookEndpoint,
)
from db.types import isoformat, utcnow
from gateway.errors import NotFound, ValidationFailed
from gateway.metrics import DELIVERY_ATTEMPTS
from gateway.queue import enqueue_job
from gateway.schemas import UTCTime
from gateway.settings import Settings
from jobs.protocol import clean_text, delivery_job_id
from webhooks.sender import ATTEMPT_ERROR_CODES
from webhooks.signing import generate_webhook_secret, webhook_headers
from webhooks.ssrf import AddressRefused, IPNetwork, parse_networks, validate_url

__all__ = [
    "ERROR_CODES",
    "EVENT_TYPES",
    "DeliveryAttemptReport",
    "EndpointCreate",
    "EndpointUpdate",
    "WebhookService",
    "create_run_deliveries",
]

log = logging.getLogger("gateway.webhooks")

endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
endpoint_secrets = EndpointSecret.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
delivery_attempts = DeliveryAttempt.__table__  # type: ignore[attr-defined]
projects = Project.__table__  # type: ignore[attr-defined]
runs = Run.__table__  # type: ignore[attr-defined]

#: The event of each final status.
FINAL_EVENTS = {
    RunStatus.COMPLETED: "run.completed",
    RunStatus.FAILED: "run.failed",
    RunStatus.CANCELED: "run.canceled",
    RunStatus.EXPIRED: "run.expired",
    RunStatus.TIMED_OUT: "run.timed_out",
}
#: Every event an endpoint can subscribe to. ``*`` means all but ``run.started``,
#: which an endpoint gets only by naming it.
EVENT_TYPES = ("run.started", *FINAL_EVENTS.values())
TEST_EVENT = "webhook.test"
RESPONSE_EXCERPT_BYTES = 2048


def _wants(events: Sequence[str], event_type: str) -> bool:
    if event_type in events:
        return True
    return "*" in events and event_type != "run.started"


# -- request models -----------------------------------------------------------


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=20)
    tasks: list[str] = Field(default_factory=list, max_length=100)
    description: str = Field(default="", max_length=1000)


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    events: list[str] | None = Field(default=None, min_length=1, max_length=20)
    tasks: list[str] | None = Field(default=None, max_length=100)
    description: str | None = Field(default=None, max_length=1000)
    enabled: bool | None = None


class RotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period: float | None = Field(default=None, ge=0, le=7 * 24 * 3600)


class RecoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: UTCTime


def _excerpt(value: Any) -> Any:
    return clean_text(value, RESPONSE_EXCERPT_BYTES) if isinstance(value, str) else value


def _message(value: Any) -> Any:
    return clean_text(value, 2000) if isinstance(value, str) else value


#: Codes of attempts that got no answer: the sender's, and the gateway's own.
ERROR_CODES = (
    *ATTEMPT_ERROR_CODES,
    "attempt_lost",  # the worker never reported the attempt (it died, or was refused)
    "record_failed",  # the answer could not be stored as it came
)


class DeliveryAttemptReport(BaseModel):
    """A worker's report of one attempt (a signed event of type ``delivery.attempt``).

    What the receiver sent back is text for a person: it is cleaned and cut
    here, never refused, so an attempt is always recorded.
    """

    type: str = Field(pattern="^delivery.attempt$")
    delivery_id: str = Field(max_length=40)
    key: str = Field(min_length=8, max_length=64)
    trigger: str = Field(pattern="^(schedule|resend)$")
    status_code: int | None = Field(default=None, ge=100, le=999)
    latency_ms: int | None = Field(default=None, ge=0)
    response_body: Annotated[str | None, BeforeValidator(_excerpt)] = None
    error: Annotated[str | None, BeforeValidator(_message)] = None
    error_code: str | None = Field(default=None, max_length=40)
    retry_after: float | None = Field(default=None, ge=0)

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# -- views --------------------------------------------------------------------


def endpoint_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "url": row["url"],
        "description": row["description"],
        "events": list(row["events"]),
        "tasks": list(row["tasks"]),
        "enabled": bool(row["enabled"]),
        "disabled_reason": row["disabled_reason"],
        "disabled_at": isoformat(row["disabled_at"]),
        "failing_since": isoformat(row["failing_since"]),
        "last_success_at": isoformat(row["last_success_at"]),
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
    }


def attempt_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "number": row["number"],
        "trigger": row["trigger"],
        "at": isoformat(row["at"]),
        "succeeded": bool(row["succeeded"]),
        "status_code": row["status_code"],
        "latency_ms": row["latency_ms"],
        "response_body": row["response_body"],
        "error": row["error"],
        "error_code": row["error_code"],
    }


def delivery_view(row: Mapping[str, Any], attempts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "event_type": row["event_type"],
        "endpoint_id": row["endpoint_id"],
        "run_id": row["run_id"],
        "url": row["url"],
        "status": row["status"],
        "attempt_count": row["attempts"],
        "next_attempt_at": isoformat(row["next_attempt_at"]),
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "created_at": isoformat(row["created_at"]),
        "delivered_at": isoformat(row["delivered_at"]),
        "payload": row["payload"],
        "attempts": [attempt_view(a) for a in attempts],
    }


# -- units of work --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """A delivery committed in the outbox, to be queued once the commit is done."""

    id: str
    url: str
    body: str
    secrets: tuple[str, ...]


def _active_secrets(conn: sa.Connection, endpoint_id: str, now: dt.datetime) -> list[str]:
    rows = conn.execute(
        sa.select(endpoint_secrets.c.secret)
        .where(
            endpoint_secrets.c.endpoint_id == endpoint_id,
            sa.or_(endpoint_secrets.c.expires_at.is_(None), endpoint_secrets.c.expires_at > now),
        )
        .order_by(endpoint_secrets.c.id.desc())
    )
    return [r.secret for r in rows]


def _project_secret(conn: sa.Connection, project_id: str) -> str:
    secret = conn.scalar(sa.select(projects.c.signing_secret).where(projects.c.id == project_id))
    if secret:
        return str(secret)
    secret = generate_webhook_secret()
    conn.execute(
        projects.update()
        .where(projects.c.id == project_id, projects.c.signing_secret.is_(None))
        .values(signing_secret=secret)
    )
    # Another process may have set it first: read back what won.
    return str(conn.scalar(sa.select(projects.c.signing_secret).where(projects.c.id == project_id)))


def _body(event_type: str, data: Any, now: dt.datetime) -> dict[str, Any]:
    return {"type": event_type, "timestamp": isoformat(now), "data": data}


def _insert_delivery(
    conn: sa.Connection,
    *,
    project_id: str,
    endpoint_id: str | None,
    run_id: str | None,
    url: str,
    event_type: str,
    payload: dict[str, Any],
    now: dt.datetime,
) -> str:
    delivery_id = new_id("msg")
    conn.execute(
        deliveries.insert(),
        {
            "id": delivery_id,
            "project_id": project_id,
            "endpoint_id": endpoint_id,
            "run_id": run_id,
            "url": url,
            "event_type": event_type,
            "payload": payload,
            "status": DeliveryStatus.PENDING.value,
            "attempts": 0,
            "schedule_step": 0,
            "next_attempt_at": now,
            # The first attempt goes out as soon as the transaction commits.
            "leased_at": now,
            "created_at": now,
            "updated_at": now,
        },
    )
    return delivery_id


def _encode(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


#: Built once: every final event of every run reads it (the hot path).
_ENABLED_ENDPOINTS = sa.select(
    endpoints.c.id, endpoints.c.url, endpoints.c.events, endpoints.c.tasks
).where(
    endpoints.c.project_id == sa.bindparam("project_id"),
    endpoints.c.enabled.is_(True),
    endpoints.c.deleted_at.is_(None),
)


def create_run_deliveries(
    conn: sa.Connection,
    run: Mapping[str, Any],
    view: Callable[[], Mapping[str, Any]],
    event_type: str,
    now: dt.datetime,
) -> list[Outgoing]:
    """Write the deliveries a run's ``event_type`` causes; call it inside the
    transaction of the transition (the outbox)."""
    rows = conn.execute(_ENABLED_ENDPOINTS, {"project_id": run["project_id"]}).all()
    wanted = [
        row
        for row in rows
        if _wants(row.events, event_type) and (not row.tasks or run["task"] in row.tasks)
    ]
    callback_url = run.get("callback_url") if event_type != "run.started" else None
    if not wanted and not callback_url:
        return []
    payload = _body(event_type, dict(view()), now)
    body = _encode(payload)
    out: list[Outgoing] = []
    for row in wanted:
        delivery_id = _insert_delivery(
            conn,
            project_id=run["project_id"],
            endpoint_id=row.id,
            run_id=run["id"],
            url=row.url,
            event_type=event_type,
            payload=payload,
            now=now,
        )
        out.append(Outgoing(delivery_id, row.url, body, tuple(_active_secrets(conn, row.id, now))))
    if callback_url:
        delivery_id = _insert_delivery(
            conn,
            project_id=run["project_id"],
            endpoint_id=None,
            run_id=run["id"],
            url=callback_url,
            event_type=event_type,
            payload=payload,
            now=now,
        )
        secret = _project_secret(conn, run["project_id"])
        out.append(Outgoing(delivery_id, callback_url, body, (secret,)))
    return out


def _load_endpoint(conn: sa.Connection, project_id: str, endpoint_id: str) -> dict[str, Any]:
    row = (
        conn.execute(
            sa.select(endpoints).where(
                endpoints.c.id == endpoint_id,
                endpoints.c.project_id == project_id,
                endpoints.c.deleted_at.is_(None),
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no webhook endpoint with id {endpoint_id!r}", code="endpoint_not_found")
    return dict(row)


def _attempts_of(conn: sa.Connection, ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    by_delivery: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if not ids:
        return by_delivery
    rows = conn.execute(
        sa.select(delivery_attempts)
        .where(delivery_attempts.c.delivery_id.in_(list(ids)))
        .order_by(delivery_attempts.c.delivery_id, delivery_attempts.c.number)
    ).mappings()
    for row in rows:
        by_delivery[row["delivery_id"]].append(dict(row))
    return by_delivery


def _list_deliveries(
    conn: sa.Connection, condition: Any, limit: int, cursor: str | None
) -> dict[str, Any]:
    query = sa.select(deliveries).where(condition)
    if cursor:
        query = query.where(deliveries.c.id < cursor)
    rows = [
        dict(r)
        for r in conn.execute(query.order_by(deliveries.c.id.desc()).limit(limit + 1)).mappings()
    ]
    page, more = rows[:limit], len(rows) > limit
    attempts = _attempts_of(conn, [r["id"] for r in page])
    return {
        "data": [delivery_view(r, attempts[r["id"]]) for r in page],
        "next_cursor": page[-1]["id"] if more and page else None,
    }


# -- the service ------------------------------------------------------------------


def _outcome_of(report: DeliveryAttemptReport) -> str:
    """The metric's ``outcome`` label of an attempt."""
    if report.succeeded:
        return "succeeded"
    if report.status_code is not None:
        return "http_error"
    return report.error_code if report.error_code in ERROR_CODES else "connection_error"


class WebhookService:
    def __init__(
        self, *, db: Database, redis: ArqRedis, settings: Settings, task_names: Sequence[str]
    ) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings
        self.allowed: tuple[IPNetwork, ...] = parse_networks(settings.webhook_allowed_networks)
        self.task_names = set(task_names)

    # validation ----------------------------------------------------------------

    def check_url(self, url: str, field: str = "url") -> str:
        """``url`` in the form the gateway stores and calls (IDNA host, see
        ``webhooks.ssrf.normalize_url``), or a 422 ``url_not_allowed``."""
        try:
            return validate_url(url, self.allowed)
        except AddressRefused as exc:
            raise ValidationFailed(
                f"this URL cannot be called: {exc.reason}",
                code="url_not_allowed",
                details=[{"path": field, "message": exc.reason, "type": "url_not_allowed"}],
            ) from None

    def _check_filters(self, events: Sequence[str] | None, tasks: Sequence[str] | None) -> None:
        details = []
        for i, event in enumerate(events or ()):
            if event != "*" and event not in EVENT_TYPES:
                details.append(
                    {
                        "path": f"events.{i}",
                        "type": "unknown_event",
                        "message": f"unknown event {event!r}; known: *, " + ", ".join(EVENT_TYPES),
                    }
                )
        for i, task in enumerate(tasks or ()):
            if task not in self.task_names:
                details.append(
                    {
                        "path": f"tasks.{i}",
                        "type": "unknown_task",
                        "message": f"no task named {task!r}",
                    }
                )
        if details:
            raise ValidationFailed(details=details)

    # endpoints -----------------------------------------------------------------

    async def create_endpoint(self, project_id: str, request: EndpointCreate) -> dict[str, Any]:
        url = self.check_url(request.url)
        self._check_filters(request.events, request.tasks)
        now = utcnow()
        secret = generate_webhook_secret()
        row = {
            "id": new_id("ep"),
            "project_id": project_id,
            "url": url,
            "description": request.description,
            "events": request.events,
            "tasks": request.tasks,
            "enabled": True,
            "disabled_reason": None,
            "disabled_at": None,
            "failing_since": None,
            "last_success_at": None,
            "created_at": now,
            "updated_at": now,
            "deleted_at": None,
        }

        def insert(conn: sa.Connection) -> None:
            conn.execute(endpoints.insert(), row)
            conn.execute(
                endpoint_secrets.insert(),
                {"endpoint_id": row["id"], "secret": secret, "created_at": now},
            )

        await self.db.write(insert)
        return {**endpoint_view(row), "secret": secret}

    async def list_endpoints(self, project_id: str) -> list[dict[str, Any]]:
        def select(conn: sa.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                sa.select(endpoints)
                .where(endpoints.c.project_id == project_id, endpoints.c.deleted_at.is_(None))
                .order_by(endpoints.c.created_at)
            ).mappings()
            return [endpoint_view(dict(r)) for r in rows]

        return await self.db.read(select)

    async def get_endpoint(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        return endpoint_view(await self.db.read(_load_endpoint, project_id, endpoint_id))

    async def update_endpoint(
        self, project_id: str, endpoint_id: str, request: EndpointUpdate
    ) -> dict[str, Any]:
        changes = request.model_dump(exclude_unset=True)
        if request.url is not None:
            changes["url"] = self.check_url(request.url)
        self._check_filters(request.events, request.tasks)
        for name in ("url", "events", "tasks", "description", "enabled"):
            if name in changes and changes[name] is None:
                raise ValidationFailed(
                    details=[{"path": name, "type": "null", "message": "may not be null"}]
                )

        def update(conn: sa.Connection) -> dict[str, Any]:
            _load_endpoint(conn, project_id, endpoint_id)
            values: dict[str, Any] = {**changes, "updated_at": utcnow()}
            if changes.get("enabled") is True:
                values.update(disabled_reason=None, disabled_at=None, failing_since=None)
            elif changes.get("enabled") is False:
                values.update(disabled_reason="disabled by the owner", disabled_at=utcnow())
            conn.execute(endpoints.update().where(endpoints.c.id == endpoint_id).values(**values))
            return _load_endpoint(conn, project_id, endpoint_id)

        return endpoint_view(await self.db.write(update))

    async def delete_endpoint(self, project_id: str, endpoint_id: str) -> None:
        """Delete the endpoint; its pending deliveries end ``failed`` at once,
        and their queued attempts are aborted before they start."""

        def delete(conn: sa.Connection) -> list[str]:
            _load_endpoint(conn, project_id, endpoint_id)
            now = utcnow()
            conn.execute(
                endpoints.update()
                .where(endpoints.c.id == endpoint_id)
                .values(deleted_at=now, enabled=False, updated_at=now)
            )
            pending = sa.and_(
                deliveries.c.endpoint_id == endpoint_id,
                deliveries.c.status == DeliveryStatus.PENDING.value,
            )
            queued = [
                delivery_job_id(r.id, r.schedule_step)
                for r in conn.execute(
                    sa.select(deliveries.c.id, deliveries.c.schedule_step).where(pending)
                )
            ]
            conn.execute(
                deliveries.update()
                .where(pending)
                .values(
                    status=DeliveryStatus.FAILED.value,
                    next_attempt_at=None,
                    leased_at=None,
                    last_error="endpoint deleted",
                    updated_at=now,
                )
            )
            return queued

        queued = await self.db.write(delete)
        if queued:
            try:
                now_ms = int(utcnow().timestamp() * 1000)
                await self.redis.zadd(abort_jobs_ss, dict.fromkeys(queued, now_ms))
            except (RedisError, OSError) as exc:
                # The attempts still ask the gateway first, and are told no.
                log.warning("could not abort the attempts of deleted endpoint: %s", exc)

    async def get_secret(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        def read(conn: sa.Connection) -> dict[str, Any]:
            _load_endpoint(conn, project_id, endpoint_id)
            now = utcnow()
            rows = (
                conn.execute(
                    sa.select(endpoint_secrets)
                    .where(
                        endpoint_secrets.c.endpoint_id == endpoint_id,
                        sa.or_(
                            endpoint_secrets.c.expires_at.is_(None),
                            endpoint_secrets.c.expires_at > now,
                        ),
                    )
                    .order_by(endpoint_secrets.c.id.desc())
                )
                .mappings()
                .all()
            )
            return {
                "secret": rows[0]["secret"],
                "previous": [
                    {"secret": r["secret"], "expires_at": isoformat(r["expires_at"])}
                    for r in rows[1:]
                ],
            }

        return await self.db.read(read)

    async def rotate_secret(
        self, project_id: str, endpoint_id: str, request: RotateRequest
    ) -> dict[str, Any]:
        grace = (
            self.settings.webhook_rotation_grace
            if request.grace_period is None
            else request.grace_period
        )

        def rotate(conn: sa.Connection) -> dict[str, Any]:
            _load_endpoint(conn, project_id, endpoint_id)
            now = utcnow()
            expires = now + dt.timedelta(seconds=grace)
            # Every secret still signing stops at the end of the grace period at
            # the latest; one that would stop sooner keeps its own end.
            conn.execute(
                endpoint_secrets.update()
                .where(
                    endpoint_secrets.c.endpoint_id == endpoint_id,
                    sa.or_(
                        endpoint_secrets.c.expires_at.is_(None),
                        endpoint_secrets.c.expires_at > expires,
                    ),
                )
                .values(expires_at=expires)
            )
            secret = generate_webhook_secret()
            conn.execute(
                endpoint_secrets.insert(),
                {"endpoint_id": endpoint_id, "secret": secret, "created_at": now},
            )
            return {"secret": secret, "previous_expires_at": isoformat(expires)}

        return await self.db.write(rotate)

    async def project_secret(self, project_id: str) -> str:
        return await self.db.write(_project_secret, project_id)

    async def send_test(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        def insert(conn: sa.Connection) -> tuple[dict[str, Any], Outgoing]:
            endpoint = _load_endpoint(conn, project_id, endpoint_id)
            now = utcnow()
            payload = _body(
                TEST_EVENT,
                {"endpoint_id": endpoint_id, "message": "a test event from the gateway"},
                now,
            )
            delivery_id = _insert_delivery(
                conn,
                project_id=project_id,
                endpoint_id=endpoint_id,
                run_id=None,
                url=endpoint["url"],
                event_type=TEST_EVENT,
                payload=payload,
                now=now,
            )
            secrets_ = tuple(_active_secrets(conn, endpoint_id, now))
            row = conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id))
            view = delivery_view(dict(row.mappings().one()), [])
            return view, Outgoing(delivery_id, endpoint["url"], _encode(payload), secrets_)

        view, outgoing = await self.db.write(insert)
        await self.dispatch([outgoing])
        return view

    # deliveries ----------------------------------------------------------------

    async def endpoint_deliveries(
        self, project_id: str, endpoint_id: str, *, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        def read(conn: sa.Connection) -> dict[str, Any]:
            _load_endpoint(conn, project_id, endpoint_id)
            return _list_deliveries(conn, deliveries.c.endpoint_id == endpoint_id, limit, cursor)

        return await self.db.read(read)

    async def run_deliveries(
        self, project_id: str, run_id: str, *, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        def read(conn: sa.Connection) -> dict[str, Any]:
            owner = conn.scalar(sa.select(runs.c.project_id).where(runs.c.id == run_id))
            if owner != project_id:
                raise NotFound(f"no run with id {run_id!r}", code="run_not_found")
            return _list_deliveries(conn, deliveries.c.run_id == run_id, limit, cursor)

        return await self.db.read(read)

    async def resend(self, project_id: str, delivery_id: str) -> dict[str, Any]:
        def reset(conn: sa.Connection) -> dict[str, Any]:
            row = (
                conn.execute(
                    sa.select(deliveries).where(
                        deliveries.c.id == delivery_id, deliveries.c.project_id == project_id
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(f"no delivery with id {delivery_id!r}", code="delivery_not_found")
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .values(status=DeliveryStatus.PENDING.value, updated_at=utcnow())
            )
            attempts = _attempts_of(conn, [delivery_id])[delivery_id]
            return delivery_view({**row, "status": DeliveryStatus.PENDING.value}, attempts)

        view = await self.db.write(reset)
        await self._enqueue(delivery_id, trigger="resend")
        return view

    async def recover(
        self, project_id: str, endpoint_id: str, request: RecoverRequest
    ) -> dict[str, Any]:
        since = request.since

        def reset(conn: sa.Connection) -> list[str]:
            _load_endpoint(conn, project_id, endpoint_id)
            ids = [
                r.id
                for r in conn.execute(
                    sa.select(deliveries.c.id)
                    .where(
                        deliveries.c.endpoint_id == endpoint_id,
                        deliveries.c.status == DeliveryStatus.FAILED.value,
                        deliveries.c.created_at >= since,
                    )
                    .order_by(deliveries.c.id)
                )
            ]
            if ids:
                conn.execute(
                    deliveries.update()
                    .where(deliveries.c.id.in_(ids))
                    .values(status=DeliveryStatus.PENDING.value, updated_at=utcnow())
                )
            return ids

        ids = await self.db.write(reset)
        for delivery_id in ids:
            await self._enqueue(delivery_id, trigger="resend")
        return {"count": len(ids), "delivery_ids": ids}

    # sending -------------------------------------------------------------------

    def _prepared(self, outgoing: Outgoing) -> dict[str, Any]:
        return {
            "send": True,
            "url": outgoing.url,
            "body": outgoing.body,
            "headers": webhook_headers(outgoing.id, outgoing.body, outgoing.secrets),
            "timeout": self.settings.webhook_timeout,
            "allowed_networks": list(self.settings.webhook_allowed_networks),
            "prepared_at": utcnow().timestamp(),
        }

    async def dispatch(self, outgoing: Sequence[Outgoing]) -> None:
        """Queue the first attempt of freshly committed deliveries.

        The job carries headers signed now, which saves the worker a round trip
        for the first attempt; later attempts ask :meth:`prepare` again.
        """
        for item in outgoing:
            await self._enqueue(item.id, trigger="schedule", prepared=self._prepared(item))

    async def _enqueue(
        self,
        delivery_id: str,
        *,
        trigger: str,
        step: int = 0,
        defer: float = 0.0,
        prepared: dict[str, Any] | None = None,
    ) -> None:
        job_id = (
            delivery_job_id(delivery_id, step)
            if trigger == "schedule"
            else f"webhook:{delivery_id}:resend:{new_id('r')}"
        )
        try:
            await enqueue_job(
                self.redis,
                "deliver_webhook",
                delivery_id,
                trigger,
                prepared,
                job_id=job_id,
                queue_name=self.settings.delivery_queue_name,
                defer_seconds=defer,
            )
        except (RedisError, OSError) as exc:
            log.warning("could not queue delivery %s (the reconciler will): %s", delivery_id, exc)

    async def requeue(self, delivery_id: str, *, step: int) -> None:
        """Queue the due attempt of a delivery whose job was lost (reconciler)."""
        await self._enqueue(delivery_id, trigger="schedule", step=step)

    @property
    def lease_seconds(self) -> float:
        """How long an attempt may stay unreported before it counts as lost:
        its own deadline, and the reconciler's grace for the report to come
        back (what a lost job of any kind is given)."""
        return self.settings.webhook_timeout + self.settings.reconcile_grace

    async def prepare(self, delivery_id: str, trigger: str = "schedule") -> dict[str, Any]:
        """What a worker should send for ``delivery_id`` now, signed afresh.

        A scheduled attempt whose predecessor went out and was never reported
        first records that one as ``attempt_lost``, and goes on from there.
        """
        policy = self._policy()
        lease_seconds = self.lease_seconds

        def lease(conn: sa.Connection) -> dict[str, Any] | Outgoing:
            row = _delivery_row(conn, delivery_id)
            if row["status"] != DeliveryStatus.PENDING.value:
                return {"send": False, "reason": f"the delivery is {row['status']}"}
            now = utcnow()
            leased = row["leased_at"]
            if (
                trigger == "schedule"
                and leased is not None
                and leased < now - dt.timedelta(seconds=lease_seconds)
            ):
                outcome = _record(conn, policy, _lost_attempt(row), now)
                return {"send": False, "reason": "the last attempt was lost", **outcome}
            if row["endpoint_id"] is None:
                secrets_: tuple[str, ...] = (_project_secret(conn, row["project_id"]),)
                url = row["url"]
            else:
                endpoint = (
                    conn.execute(sa.select(endpoints).where(endpoints.c.id == row["endpoint_id"]))
                    .mappings()
                    .one()
                )
                if not endpoint["enabled"] or endpoint["deleted_at"] is not None:
                    reason = (
                        "endpoint deleted"
                        if endpoint["deleted_at"] is not None
                        else f"endpoint disabled: {endpoint['disabled_reason']}"
                    )
                    conn.execute(
                        deliveries.update()
                        .where(deliveries.c.id == delivery_id)
                        .values(
                            status=DeliveryStatus.FAILED.value,
                            next_attempt_at=None,
                            leased_at=None,
                            last_error=reason,
                            updated_at=now,
                        )
                    )
                    return {"send": False, "reason": reason}
                secrets_ = (*_active_secrets(conn, endpoint["id"], now),)
                url = endpoint["url"]
            if trigger == "schedule":
                conn.execute(
                    deliveries.update().where(deliveries.c.id == delivery_id).values(leased_at=now)
                )
            return Outgoing(delivery_id, url, _encode(row["payload"]), secrets_)

        result = await self.db.write(lease)
        if isinstance(result, Outgoing):
            return self._prepared(result)
        if result.get("recorded"):
            DELIVERY_ATTEMPTS.labels(outcome="attempt_lost").inc()
            await self._after_record(delivery_id, result)
        return {"send": False, "reason": result["reason"]}

    def _policy(self) -> _RetryPolicy:
        settings = self.settings
        return _RetryPolicy(
            schedule=settings.webhook_retry_schedule,
            jitter=settings.webhook_retry_jitter,
            retry_after_max=settings.webhook_retry_after_max,
            disable_after=settings.webhook_disable_after,
        )

    async def record_attempt(self, report: DeliveryAttemptReport) -> dict[str, Any]:
        """Record one attempt (once, by its key) and decide what comes next.

        An answer that cannot be stored as it came (a driver's surprise) is
        stored without its excerpt, as ``record_failed``: the attempt is never
        lost, and the delivery moves on.
        """
        policy = self._policy()
        try:
            outcome = await self.db.write(_record, policy, report, utcnow())
        except (sa.exc.DataError, sa.exc.StatementError, ValueError) as exc:
            if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
                raise  # the database is away: the worker retries the report
            log.error("attempt of %s could not be stored as it came: %s", report.delivery_id, exc)
            plain = report.model_copy(
                update={
                    "response_body": None,
                    "error_code": "record_failed",
                    "error": clean_text(f"the answer could not be stored: {exc}", 2000),
                }
            )
            outcome = await self.db.write(_record, policy, plain, utcnow())
        if outcome["recorded"]:
            DELIVERY_ATTEMPTS.labels(outcome=_outcome_of(report)).inc()
        await self._after_record(report.delivery_id, outcome)
        return {"recorded": outcome["recorded"], "next_attempt_in": outcome["next_attempt_in"]}

    async def _after_record(self, delivery_id: str, outcome: Mapping[str, Any]) -> None:
        if outcome["next_attempt_in"] is not None:
            await self._enqueue(
                delivery_id,
                trigger="schedule",
                step=outcome["step"],
                defer=outcome["next_attempt_in"],
            )


@dataclasses.dataclass(frozen=True)
class _RetryPolicy:
    schedule: tuple[float, ...]
    jitter: float
    retry_after_max: float
    disable_after: float

    def delay(self, step: int, retry_after: float | None) -> float | None:
        """Seconds before scheduled attempt ``step`` (from 0), ``None`` past the end."""
        if step >= len(self.schedule):
            return None
        delay = self.schedule[step] * (1 + random.uniform(-self.jitter, self.jitter))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max))
        return delay


def _delivery_row(conn: sa.Connection, delivery_id: str) -> dict[str, Any]:
    row = (
        conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id)).mappings().first()
    )
    if row is None:
        raise NotFound(f"no delivery with id {delivery_id!r}", code="delivery_not_found")
    return dict(row)


def _lost_attempt(row: Mapping[str, Any]) -> DeliveryAttemptReport:
    """The record of an attempt that went out at ``leased_at`` and was never reported."""
    return DeliveryAttemptReport(
        type="delivery.attempt",
        delivery_id=row["id"],
        key=f"lost:{row['id'][-24:]}:{row['schedule_step']}",
        trigger="schedule",
        error_code="attempt_lost",
        error="the worker never reported this attempt (it stopped, or its report was refused)",
    )


def _record(
    conn: sa.Connection, policy: _RetryPolicy, report: DeliveryAttemptReport, now: dt.datetime
) -> dict[str, Any]:
    """Record one attempt (once, by its key); the delivery's next step."""
    if (
        conn.scalar(sa.select(delivery_attempts.c.id).where(delivery_attempts.c.key == report.key))
        is not None
    ):
        return {"recorded": False, "next_attempt_in": None, "step": 0}
    row = _delivery_row(conn, report.delivery_id)
    number = row["attempts"] + 1
    conn.execute(
        delivery_attempts.insert(),
        {
            "delivery_id": row["id"],
            "key": report.key,
            "number": number,
            "trigger": report.trigger,
            "at": now,
            "succeeded": report.succeeded,
            "status_code": report.status_code,
            "latency_ms": report.latency_ms,
            "response_body": report.response_body,
            "error": report.error,
            "error_code": report.error_code,
        },
    )
    values: dict[str, Any] = {
        "attempts": number,
        "last_status_code": report.status_code,
        "last_error": report.error,
        "updated_at": now,
    }
    scheduled = report.trigger == "schedule"
    step = row["schedule_step"] + (1 if scheduled else 0)
    values["schedule_step"] = step
    if scheduled:
        values["leased_at"] = None
    endpoint_id = row["endpoint_id"]
    next_in: float | None = None
    if report.succeeded:
        values.update(
            status=DeliveryStatus.DELIVERED.value,
            delivered_at=now,
            next_attempt_at=None,
            leased_at=None,
            last_error=None,
        )
        if endpoint_id is not None:
            conn.execute(
                endpoints.update()
                .where(endpoints.c.id == endpoint_id)
                .values(failing_since=None, last_success_at=now)
            )
    else:
        disabled = endpoint_id is not None and _note_failure(
            conn, policy, endpoint_id, report.status_code, now
        )
        if row["status"] != DeliveryStatus.PENDING.value and scheduled:
            pass  # delivered meanwhile (by a resend): nothing more to do
        elif disabled:
            values.update(status=DeliveryStatus.FAILED.value, next_attempt_at=None)
        elif scheduled:
            next_in = policy.delay(step, report.retry_after)
            if next_in is None:
                values.update(status=DeliveryStatus.FAILED.value, next_attempt_at=None)
            else:
                values["next_attempt_at"] = now + dt.timedelta(seconds=next_in)
        elif row["next_attempt_at"] is None:
            # A resend that failed, with no scheduled retry left behind it.
            values.update(status=DeliveryStatus.FAILED.value)
    if row["status"] == DeliveryStatus.DELIVERED.value:
        values.pop("status", None)
        values.pop("last_error", None)
    conn.execute(deliveries.update().where(deliveries.c.id == row["id"]).values(**values))
    return {"recorded": True, "next_attempt_in": next_in, "step": step}


def _note_failure(
    conn: sa.Connection,
    policy: _RetryPolicy,
    endpoint_id: str,
    status_code: int | None,
    now: dt.datetime,
) -> bool:
    """Track the endpoint's failures; ``True`` if it is (now) disabled."""
    endpoint = (
        conn.execute(sa.select(endpoints).where(endpoints.c.id == endpoint_id)).mappings().one()
    )
    if not endpoint["enabled"]:
        return True
    failing_since = endpoint["failing_since"] or now
    reason = None
    if status_code == 410:
        reason = "the receiver answered 410 Gone"
    elif (now - failing_since).total_seconds() > policy.disable_after:
        reason = f"failing without a success since {isoformat(failing_since)}"
    values: dict[str, Any] = {"failing_since": failing_since, "updated_at": now}
    if reason is not None:
        values.update(enabled=False, disabled_reason=reason, disabled_at=now)
        log.warning("disabled webhook endpoint %s: %s", endpoint_id, reason)
    conn.execute(endpoints.update().where(endpoints.c.id == endpoint_id).values(**values))
    return reason is not None
