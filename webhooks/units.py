"""The callback service's units of work: each one sync function ``fn(conn,
...)``, run whole in one transaction by ``db.engine.Database`` (as the run
state machine's are: docs/architecture.md, "Units of work and their effects").

``webhooks.service`` checks the requests and runs these; what they set in
motion (queued attempts, aborted jobs) it does after the commit.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from db.models import Delivery, DeliveryStatus, EndpointSecret, Run, WebhookEndpoint
from db.rows import owned_row
from db.types import isoformat, utcnow
from gateway.errors import NotFound
from jobs.protocol import delivery_job_id
from webhooks.deliveries import attempts_of, delivery_view, list_deliveries
from webhooks.endpoints import endpoint_view, load_endpoint
from webhooks.outbox import (
    TEST_EVENT,
    Outgoing,
    active_secrets,
    encode_body,
    event_body,
    insert_delivery,
)

__all__ = [
    "delete_endpoint",
    "endpoint_deliveries",
    "insert_endpoint",
    "insert_test_delivery",
    "list_endpoints",
    "read_secrets",
    "recover_deliveries",
    "reset_delivery",
    "rotate_secret",
    "run_deliveries",
    "update_endpoint",
]

endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
endpoint_secrets = EndpointSecret.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
runs = Run.__table__  # type: ignore[attr-defined]


# endpoints -------------------------------------------------------------------------


def insert_endpoint(conn: sa.Connection, row: dict[str, Any], secret: str) -> None:
    """A new endpoint (``row``, checked already) with its first secret."""
    conn.execute(endpoints.insert(), row)
    conn.execute(
        endpoint_secrets.insert(),
        {"endpoint_id": row["id"], "secret": secret, "created_at": row["created_at"]},
    )


def list_endpoints(conn: sa.Connection, project_id: str) -> list[dict[str, Any]]:
    """The project's endpoints that are not deleted, oldest first."""
    rows = conn.execute(
        sa.select(endpoints)
        .where(endpoints.c.project_id == project_id, endpoints.c.deleted_at.is_(None))
        .order_by(endpoints.c.created_at)
    ).mappings()
    return [endpoint_view(dict(r)) for r in rows]


def update_endpoint(
    conn: sa.Connection, project_id: str, endpoint_id: str, changes: dict[str, Any]
) -> dict[str, Any]:
    """Apply ``changes`` (checked already); re-enabling clears why it was
    disabled and its failing span, disabling says it was the owner."""
    load_endpoint(conn, project_id, endpoint_id)
    now = utcnow()
    values: dict[str, Any] = {**changes, "updated_at": now}
    if changes.get("enabled") is True:
        values.update(disabled_reason=None, disabled_at=None, failing_since=None)
    elif changes.get("enabled") is False:
        values.update(disabled_reason="disabled by the owner", disabled_at=now)
    conn.execute(endpoints.update().where(endpoints.c.id == endpoint_id).values(**values))
    return load_endpoint(conn, project_id, endpoint_id)


def delete_endpoint(conn: sa.Connection, project_id: str, endpoint_id: str) -> list[str]:
    """Delete the endpoint and end its pending deliveries ``failed``; returns
    the job IDs of their queued attempts, to abort after the commit."""
    load_endpoint(conn, project_id, endpoint_id)
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
        for r in conn.execute(sa.select(deliveries.c.id, deliveries.c.schedule_step).where(pending))
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


def read_secrets(conn: sa.Connection, project_id: str, endpoint_id: str) -> dict[str, Any]:
    """The secret that signs now (the newest) and the rotated-out ones still
    signing beside it, with their ends."""
    load_endpoint(conn, project_id, endpoint_id)
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
            {"secret": r["secret"], "expires_at": isoformat(r["expires_at"])} for r in rows[1:]
        ],
    }


def rotate_secret(
    conn: sa.Connection, project_id: str, endpoint_id: str, new_secret: str, grace: float
) -> dict[str, Any]:
    """``new_secret`` signs from now; every secret still signing stops at the
    end of ``grace`` seconds at the latest (one that would stop sooner keeps
    its own end)."""
    load_endpoint(conn, project_id, endpoint_id)
    now = utcnow()
    expires = now + dt.timedelta(seconds=grace)
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
    conn.execute(
        endpoint_secrets.insert(),
        {"endpoint_id": endpoint_id, "secret": new_secret, "created_at": now},
    )
    return {"secret": new_secret, "previous_expires_at": isoformat(expires)}


def insert_test_delivery(
    conn: sa.Connection, project_id: str, endpoint_id: str
) -> tuple[dict[str, Any], Outgoing]:
    """A ``webhook.test`` message to the endpoint, in the outbox: its view,
    and what to dispatch after the commit."""
    endpoint = load_endpoint(conn, project_id, endpoint_id)
    now = utcnow()
    payload = event_body(
        TEST_EVENT,
        {"endpoint_id": endpoint_id, "message": "a test event from the gateway"},
        now,
    )
    delivery_id = insert_delivery(
        conn,
        project_id=project_id,
        endpoint_id=endpoint_id,
        run_id=None,
        url=endpoint["url"],
        event_type=TEST_EVENT,
        payload=payload,
        now=now,
    )
    secrets = tuple(active_secrets(conn, endpoint_id, now))
    row = conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id))
    view = delivery_view(dict(row.mappings().one()), [])
    return view, Outgoing(delivery_id, endpoint["url"], encode_body(payload), secrets, endpoint_id)


# deliveries ------------------------------------------------------------------------


def endpoint_deliveries(
    conn: sa.Connection, project_id: str, endpoint_id: str, limit: int, cursor: str | None
) -> dict[str, Any]:
    """A page of the endpoint's messages, newest first, with their attempts."""
    load_endpoint(conn, project_id, endpoint_id)
    return list_deliveries(conn, deliveries.c.endpoint_id == endpoint_id, limit, cursor)


def run_deliveries(
    conn: sa.Connection, project_id: str, run_id: str, limit: int, cursor: str | None
) -> dict[str, Any]:
    """A page of the run's messages (another project's run is not found)."""
    owned_row(
        conn, runs, run_id, project_id, NotFound(f"no run with id {run_id!r}", code="run_not_found")
    )
    return list_deliveries(conn, deliveries.c.run_id == run_id, limit, cursor)


def reset_delivery(conn: sa.Connection, project_id: str, delivery_id: str) -> dict[str, Any]:
    """Make a message pending again, to be sent at once (same ``webhook-id``)."""
    row = owned_row(
        conn,
        deliveries,
        delivery_id,
        project_id,
        NotFound(f"no delivery with id {delivery_id!r}", code="delivery_not_found"),
    )
    conn.execute(
        deliveries.update()
        .where(deliveries.c.id == delivery_id)
        .values(status=DeliveryStatus.PENDING.value, updated_at=utcnow())
    )
    attempts = attempts_of(conn, [delivery_id])[delivery_id]
    return delivery_view({**row, "status": DeliveryStatus.PENDING.value}, attempts)


def recover_deliveries(
    conn: sa.Connection,
    project_id: str,
    endpoint_id: str,
    since: dt.datetime,
    include_pending: bool,
) -> dict[str, list[str]]:
    """The endpoint's messages since ``since`` that failed (made pending
    again) and, with ``include_pending``, those waiting for a retry; by
    status."""
    statuses = [DeliveryStatus.FAILED.value]
    if include_pending:
        statuses.append(DeliveryStatus.PENDING.value)
    load_endpoint(conn, project_id, endpoint_id)
    found: dict[str, list[str]] = {status: [] for status in statuses}
    for row in conn.execute(
        sa.select(deliveries.c.id, deliveries.c.status)
        .where(
            deliveries.c.endpoint_id == endpoint_id,
            deliveries.c.status.in_(statuses),
            deliveries.c.created_at >= since,
        )
        .order_by(deliveries.c.id)
    ):
        found[row.status].append(row.id)
    failed = found[DeliveryStatus.FAILED.value]
    if failed:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id.in_(failed))
            .values(status=DeliveryStatus.PENDING.value, updated_at=utcnow())
        )
    return found
