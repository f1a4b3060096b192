"""The outbox: deliveries written in the same transaction as the transition that causes them.

A delivery is one event for one URL; its ID is the ``webhook-id`` header. It
is written inside the transaction of the run transition that causes it
(docs/architecture.md, invariant 4), so a committed transition always has its
deliveries; the gateway queues their first attempts once the commit is done.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSON, aggregate_order_by

from db.ids import new_id
from db.many import execute_many
from db.models import (
    Delivery,
    DeliveryStatus,
    EndpointSecret,
    Project,
    Run,
    RunStatus,
    WebhookEndpoint,
)
from db.types import UTCDateTime, isoformat
from webhooks.signing import generate_webhook_secret

__all__ = [
    "EVENT_TYPES",
    "FINAL_EVENTS",
    "TEST_EVENT",
    "Outgoing",
    "RunDeliveries",
    "active_secrets",
    "create_event_deliveries",
    "create_run_deliveries",
    "encode_body",
    "endpoints_of_runs",
    "event_body",
    "insert_delivery",
    "project_secret",
    "wants",
]

endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
endpoint_secrets = EndpointSecret.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
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
EVENT_TYPES = ("run.started", *FINAL_EVENTS.values(), "waitpoint.completed")
TEST_EVENT = "webhook.test"
RESPONSE_EXCERPT_BYTES = 2048


def wants(events: Sequence[str], event_type: str) -> bool:
    if event_type in events:
        return True
    return "*" in events and event_type != "run.started"


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """A delivery committed in the outbox, to be queued once the commit is done."""

    id: str
    url: str
    body: str
    secrets: tuple[str, ...]
    #: Who receives it (an endpoint, or a run's callback URL): whose turns
    #: its attempts take on the deliveries queue.
    receiver: str | None = None
    #: The event, and the trace of the run it is about (``jobs.tracing``).
    event_type: str | None = None
    traceparent: str | None = None


# Built once: the hot path (every final event of every run) runs these.
#: A secret that signs now: none past its ``expires_at`` (a rotation's old one).
_SIGNS_NOW = sa.or_(
    endpoint_secrets.c.expires_at.is_(None),
    endpoint_secrets.c.expires_at > sa.bindparam("now", type_=UTCDateTime()),
)
_ACTIVE_SECRETS = (
    sa.select(endpoint_secrets.c.secret)
    .where(endpoint_secrets.c.endpoint_id == sa.bindparam("endpoint_id"), _SIGNS_NOW)
    .order_by(endpoint_secrets.c.id.desc())
)
_PROJECT_SECRET = sa.select(projects.c.signing_secret).where(
    projects.c.id == sa.bindparam("project_id")
)
_INSERT_DELIVERY = deliveries.insert()


def active_secrets(conn: sa.Connection, endpoint_id: str, now: dt.datetime) -> list[str]:
    """The endpoint's secrets that sign now, newest first."""
    rows = conn.execute(_ACTIVE_SECRETS, {"endpoint_id": endpoint_id, "now": now})
    return [r.secret for r in rows]


def project_secret(conn: sa.Connection, project_id: str) -> str:
    """The project's signing secret for one-off callback URLs (made on first use)."""
    secret = conn.scalar(_PROJECT_SECRET, {"project_id": project_id})
    if secret:
        return str(secret)
    secret = generate_webhook_secret()
    conn.execute(
        projects.update()
        .where(projects.c.id == project_id, projects.c.signing_secret.is_(None))
        .values(signing_secret=secret)
    )
    # Another process may have set it first: read back what won.
    return str(conn.scalar(_PROJECT_SECRET, {"project_id": project_id}))


def event_body(event_type: str, data: Any, now: dt.datetime) -> dict[str, Any]:
    return {"type": event_type, "timestamp": isoformat(now), "data": data}


def insert_delivery(
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
    # Its time is its lease's start (``leased_at``): gateway dispatch reads it.
    delivery_id = new_id("msg", at=now)
    conn.execute(
        _INSERT_DELIVERY,
        _delivery_row(delivery_id, project_id, endpoint_id, run_id, url, event_type, payload, now),
    )
    return delivery_id


def _delivery_row(
    delivery_id: str,
    project_id: str,
    endpoint_id: str | None,
    run_id: str | None,
    url: str,
    event_type: str,
    payload: dict[str, Any],
    now: dt.datetime,
) -> dict[str, Any]:
    return {
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
    }


def encode_body(payload: Mapping[str, Any]) -> str:
    """A callback's body: compact UTF-8 JSON. orjson's, about ten times
    faster than ``json``'s (every callback is encoded on the report path);
    ``json``'s for what orjson has no form for (an integer past 64 bits)."""
    try:
        return orjson.dumps(payload).decode()
    except TypeError:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


#: Built once: every final event of every run reads it (the hot path).
_IN_USE = (endpoints.c.enabled.is_(True), endpoints.c.deleted_at.is_(None))
_ENABLED = (endpoints.c.project_id == sa.bindparam("project_id"), *_IN_USE)
_ENABLED_ENDPOINTS = sa.select(
    endpoints.c.id, endpoints.c.url, endpoints.c.events, endpoints.c.tasks
).where(*_ENABLED)


_SIGNING_JOIN = endpoints.outerjoin(
    endpoint_secrets, sa.and_(endpoint_secrets.c.endpoint_id == endpoints.c.id, _SIGNS_NOW)
)
#: The same, with each endpoint's secrets that sign now (newest first): one
#: row per endpoint and secret, so that a run's final event reads both at once.
_ENDPOINTS_SIGNING = (
    _ENABLED_ENDPOINTS.add_columns(endpoint_secrets.c.secret)
    .select_from(_SIGNING_JOIN)
    .order_by(endpoints.c.id, endpoint_secrets.c.id.desc())
)


class _Endpoint(NamedTuple):
    """An entry of :func:`endpoints_of_runs`'s JSON, as ``_ENDPOINTS_SIGNING``
    gives a row."""

    id: str
    url: str
    events: list[str]
    tasks: list[str]
    secret: str | None


def endpoints_of_runs(run_ids: sa.ColumnElement[bool]) -> sa.CTE:
    """PostgreSQL: the enabled endpoints (with their secrets that sign now) of
    the projects of the runs that ``run_ids`` picks, as one JSON array a
    project (``endpoints_json``), for a read of runs to join: their
    deliveries need no read of their own (:meth:`RunDeliveries.know`)."""
    pairs: list[Any] = []
    for column in (*_ENABLED_ENDPOINTS.selected_columns, endpoint_secrets.c.secret):
        pairs += [sa.literal_column(f"'{column.name}'"), column]
    projects_of_runs = sa.select(runs.c.project_id).where(run_ids)
    return (
        sa.select(
            endpoints.c.project_id,
            sa.func.json_agg(
                aggregate_order_by(
                    sa.func.json_build_object(*pairs),
                    endpoints.c.id,
                    endpoint_secrets.c.id.desc(),
                ),
                type_=JSON(),
            ).label("endpoints_json"),
        )
        .select_from(_SIGNING_JOIN)
        .where(endpoints.c.project_id.in_(projects_of_runs), *_IN_USE)
        .group_by(endpoints.c.project_id)
        .cte("project_endpoints")
    )


class RunDeliveries:
    """The deliveries that runs' events cause, written together inside the
    transaction of their transitions (the outbox): each project's endpoints
    with their secrets (one read) and each project's secret are read once,
    and every delivery goes in one INSERT at :meth:`write`."""

    def __init__(self, conn: sa.Connection, now: dt.datetime) -> None:
        self.conn = conn
        self.now = now
        self._endpoints: dict[str, Sequence[Any]] = {}
        self._secrets: dict[str, tuple[str, ...]] = {}
        self._rows: list[dict[str, Any]] = []

    def know(self, project_id: str, endpoints_json: list[dict[str, Any]] | None) -> None:
        """Take the project's endpoints as :func:`endpoints_of_runs` read them
        (``None``: it has none) instead of reading them again."""
        if project_id not in self._endpoints:
            self._keep(project_id, [_Endpoint(**row) for row in endpoints_json or ()])

    def _enabled(self, project_id: str) -> Sequence[Any]:
        """The project's enabled endpoints; their secrets are read with them."""
        known = self._endpoints.get(project_id)
        if known is not None:
            return known
        rows = self.conn.execute(
            _ENDPOINTS_SIGNING, {"project_id": project_id, "now": self.now}
        ).all()
        return self._keep(project_id, rows)

    def _keep(self, project_id: str, rows: Sequence[Any]) -> Sequence[Any]:
        found: list[Any] = []
        signing: dict[str, list[str]] = {}
        for row in rows:
            if row.id not in signing:
                found.append(row)
                signing[row.id] = []
            if row.secret is not None:
                signing[row.id].append(row.secret)
        self._secrets.update((key, tuple(value)) for key, value in signing.items())
        self._endpoints[project_id] = found
        return found

    def receivers(self, run: Mapping[str, Any], event_type: str) -> list[tuple[str | None, str]]:
        """``(endpoint ID, URL)`` of each receiver of the run's ``event_type``;
        ``None`` for the run's own callback URL. Empty: no delivery, and no
        need of the run's view."""
        found: list[tuple[str | None, str]] = [
            (row.id, row.url)
            for row in self._enabled(run["project_id"])
            if wants(row.events, event_type) and (not row.tasks or run["task"] in row.tasks)
        ]
        callback_url = run.get("callback_url") if event_type != "run.started" else None
        if callback_url:
            found.append((None, callback_url))
        return found

    def _signing(self, project_id: str, endpoint_id: str | None) -> tuple[str, ...]:
        key = endpoint_id or f"project:{project_id}"
        secrets = self._secrets.get(key)
        if secrets is None:
            if endpoint_id is None:
                secrets = (project_secret(self.conn, project_id),)
            else:
                secrets = tuple(active_secrets(self.conn, endpoint_id, self.now))
            self._secrets[key] = secrets
        return secrets

    def add(
        self,
        run: Mapping[str, Any],
        event_type: str,
        view: Mapping[str, Any],
        receivers: Sequence[tuple[str | None, str]],
    ) -> list[Outgoing]:
        """The deliveries of the run's ``event_type`` to ``receivers`` (from
        :meth:`receivers`), whose body is ``view``; written at :meth:`write`."""
        payload = event_body(event_type, dict(view), self.now)
        body = encode_body(payload)
        out: list[Outgoing] = []
        for endpoint_id, url in receivers:
            delivery_id = new_id("msg", at=self.now)  # as in insert_delivery
            self._rows.append(
                _delivery_row(
                    delivery_id,
                    run["project_id"],
                    endpoint_id,
                    run["id"],
                    url,
                    event_type,
                    payload,
                    self.now,
                )
            )
            out.append(
                Outgoing(
                    delivery_id,
                    url,
                    body,
                    self._signing(run["project_id"], endpoint_id),
                    endpoint_id or url,
                    event_type,
                    run.get("traceparent"),
                )
            )
        return out

    def write(self) -> None:
        """Insert the deliveries added so far."""
        rows = self.take()
        if rows:
            execute_many(self.conn, _INSERT_DELIVERY, rows)

    def take(self) -> list[dict[str, Any]]:
        """The rows of the deliveries added so far, for a statement of the
        caller's to insert instead of :meth:`write` (PostgreSQL's report
        sets insert them in their compare-and-set: one round trip fewer)."""
        rows, self._rows = self._rows, []
        return rows


def create_run_deliveries(
    conn: sa.Connection,
    run: Mapping[str, Any],
    view: Callable[[], Mapping[str, Any]],
    event_type: str,
    now: dt.datetime,
) -> list[Outgoing]:
    """Write the deliveries a run's ``event_type`` causes; call it inside the
    transaction of the transition (the outbox). ``view`` is called only if
    someone receives it."""
    batch = RunDeliveries(conn, now)
    receivers = batch.receivers(run, event_type)
    if not receivers:
        return []
    out = batch.add(run, event_type, view(), receivers)
    batch.write()
    return out


def create_event_deliveries(
    conn: sa.Connection, project_id: str, event_type: str, data: Any, now: dt.datetime
) -> list[Outgoing]:
    """Write the deliveries of a project's event that belongs to no run (a
    waitpoint's), to every endpoint that wants it and filters on no task."""
    rows = conn.execute(_ENABLED_ENDPOINTS, {"project_id": project_id}).all()
    wanted = [row for row in rows if wants(row.events, event_type) and not row.tasks]
    if not wanted:
        return []
    payload = event_body(event_type, data, now)
    body = encode_body(payload)
    out: list[Outgoing] = []
    for row in wanted:
        delivery_id = insert_delivery(
            conn,
            project_id=project_id,
            endpoint_id=row.id,
            run_id=None,
            url=row.url,
            event_type=event_type,
            payload=payload,
            now=now,
        )
        out.append(
            Outgoing(delivery_id, row.url, body, tuple(active_secrets(conn, row.id, now)), row.id)
        )
    return out
