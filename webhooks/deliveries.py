"""Deliveries and their attempts: recording each try, and deciding what comes next.

Every try ends as a recorded attempt: an answer, or a failure with an
``error_code``; a try never reported (its worker died) is recorded as
``attempt_lost`` when the next one is prepared. The retry schedule, a
receiver's ``410 Gone`` or ``WEBHOOK_DISABLE_AFTER`` without a success end
every delivery.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from db.many import execute_many
from db.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    WebhookEndpoint,
)
from db.types import UTCDateTime, isoformat
from gateway.errors import NotFound
from webhooks.models import ERROR_CODES, DeliveryAttemptReport

__all__ = [
    "RetryPolicy",
    "attempt_view",
    "attempts_of",
    "delivery_row",
    "delivery_view",
    "list_deliveries",
    "lost_attempt",
    "note_failure",
    "outcome_of",
    "record_attempt",
    "record_attempts",
]

log = logging.getLogger("webhooks.deliveries")

endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
delivery_attempts = DeliveryAttempt.__table__  # type: ignore[attr-defined]


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


def attempts_of(conn: sa.Connection, ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
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


def list_deliveries(
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
    attempts = attempts_of(conn, [r["id"] for r in page])
    return {
        "data": [delivery_view(r, attempts[r["id"]]) for r in page],
        "next_cursor": page[-1]["id"] if more and page else None,
    }


def outcome_of(report: DeliveryAttemptReport) -> str:
    """The metric's ``outcome`` label of an attempt."""
    if report.succeeded:
        return "succeeded"
    if report.status_code is not None:
        return "http_error"
    return report.error_code if report.error_code in ERROR_CODES else "connection_error"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
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


# Built once: every attempt of every callback runs these.
_DELIVERY = sa.select(deliveries).where(deliveries.c.id == sa.bindparam("delivery_id"))
_ATTEMPT_BY_KEY = sa.select(delivery_attempts.c.id).where(
    delivery_attempts.c.key == sa.bindparam("key")
)
_INSERT_ATTEMPT = delivery_attempts.insert()
_ENDPOINT_SUCCEEDED = (
    endpoints.update()
    .where(endpoints.c.id == sa.bindparam("endpoint_id"))
    .values(
        failing_since=None,
        last_success_at=sa.bindparam("now", type_=endpoints.c.last_success_at.type),
    )
)


@functools.lru_cache(maxsize=64)
def _update_delivery(names: tuple[str, ...]) -> sa.Update:
    """The UPDATE of a delivery that sets ``names``, one per shape of change."""
    values = {n: sa.bindparam(f"v_{n}", type_=deliveries.c[n].type) for n in names}
    update: sa.Update = deliveries.update().where(deliveries.c.id == sa.bindparam("w_id"))
    return update.values(values)


def delivery_row(conn: sa.Connection, delivery_id: str) -> dict[str, Any]:
    row = conn.execute(_DELIVERY, {"delivery_id": delivery_id}).mappings().first()
    if row is None:
        raise NotFound(f"no delivery with id {delivery_id!r}", code="delivery_not_found")
    return dict(row)


def lost_attempt(row: Mapping[str, Any]) -> DeliveryAttemptReport:
    """The record of an attempt that went out at ``leased_at`` and was never reported."""
    return DeliveryAttemptReport(
        type="delivery.attempt",
        delivery_id=row["id"],
        key=f"lost:{row['id'][-24:]}:{row['schedule_step']}",
        trigger="schedule",
        error_code="attempt_lost",
        error="the worker never reported this attempt (it stopped, or its report was refused)",
    )


def record_attempt(
    conn: sa.Connection, policy: RetryPolicy, report: DeliveryAttemptReport, now: dt.datetime
) -> dict[str, Any]:
    """Record one attempt (once, by its key); the delivery's next step."""
    if conn.scalar(_ATTEMPT_BY_KEY, {"key": report.key}) is not None:
        return {"recorded": False, "next_attempt_in": None, "step": 0}
    row = delivery_row(conn, report.delivery_id)
    number = row["attempts"] + 1
    conn.execute(
        _INSERT_ATTEMPT,
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
            conn.execute(_ENDPOINT_SUCCEEDED, {"endpoint_id": endpoint_id, "now": now})
    else:
        disabled = endpoint_id is not None and note_failure(
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
    params = {f"v_{name}": value for name, value in values.items()}
    conn.execute(_update_delivery(tuple(values)), {"w_id": row["id"], **params})
    return {"recorded": True, "next_attempt_in": next_in, "step": step}


def _many(column: sa.ColumnElement[Any], name: str, dialect: str) -> sa.ColumnElement[bool]:
    """``column`` in the bound list ``name``: ``= ANY`` of one array on
    PostgreSQL (one prepared statement for every length), ``IN`` on SQLite."""
    if dialect == "postgresql":
        return column == sa.any_(sa.bindparam(name, type_=ARRAY(sa.String())))
    return column.in_(sa.bindparam(name, expanding=True))


_DIALECTS = ("postgresql", "sqlite")
_RECORDED_KEYS = {
    d: sa.select(delivery_attempts.c.key).where(_many(delivery_attempts.c.key, "keys", d))
    for d in _DIALECTS
}
_DELIVERIES_OF = {
    d: sa.select(
        deliveries.c.id,
        deliveries.c.status,
        deliveries.c.attempts,
        deliveries.c.schedule_step,
        deliveries.c.endpoint_id,
    ).where(_many(deliveries.c.id, "ids", d))
    for d in _DIALECTS
}
_NOW = sa.bindparam("now", type_=UTCDateTime())
#: SQLite's: one row per parameter set, sent as one ``executemany``.
_DELIVERED_ONE = (
    deliveries.update()
    .where(deliveries.c.id == sa.bindparam("w_id"))
    .values(
        status=DeliveryStatus.DELIVERED.value,
        attempts=sa.bindparam("v_attempts"),
        last_status_code=sa.bindparam("v_status_code"),
        last_error=None,
        updated_at=_NOW,
        schedule_step=sa.bindparam("v_step"),
        leased_at=None,
        delivered_at=_NOW,
        next_attempt_at=None,
    )
)
_DELIVERED = sa.text(
    """
    UPDATE deliveries SET status = :delivered, attempts = v.attempts,
        last_status_code = v.status_code, last_error = NULL, updated_at = :now,
        schedule_step = v.step, leased_at = NULL, delivered_at = :now,
        next_attempt_at = NULL
    FROM unnest(
        CAST(:ids AS varchar[]), CAST(:attempts AS integer[]),
        CAST(:status_codes AS integer[]), CAST(:steps AS integer[])
    ) AS v(id, attempts, status_code, step)
    WHERE deliveries.id = v.id
    """
).bindparams(_NOW, sa.bindparam("delivered", DeliveryStatus.DELIVERED.value))

#: PostgreSQL's: the attempts of a batch's deliveries, in one statement (an
#: ``executemany`` is one execution in the server for each row); each
#: column's values in one array, named as the column.
_DELIVERED_ARRAYS = {
    "delivery_id": "varchar",
    "key": "varchar",
    "number": "integer",
    "trigger": "varchar",
    "status_code": "integer",
    "latency_ms": "integer",
    "response_body": "text",
    "error": "text",
    "error_code": "varchar",
}
_INSERT_DELIVERED = sa.text(
    """
    INSERT INTO delivery_attempts ({names}, at, succeeded)
    SELECT {names}, :at, true
    FROM unnest({arrays}) AS v({names})
    """.format(
        names=", ".join(_DELIVERED_ARRAYS),
        arrays=", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in _DELIVERED_ARRAYS.items()),
    )
).bindparams(sa.bindparam("at", type_=UTCDateTime()))


def record_attempts(
    conn: sa.Connection,
    policy: RetryPolicy,
    reports: Sequence[DeliveryAttemptReport],
    now: dt.datetime,
) -> list[dict[str, Any] | NotFound]:
    """Record many attempts (each once, by its key), as :func:`record_attempt`
    does one; each one's outcome, or :class:`NotFound` for a delivery that is
    not there.

    The successes of deliveries not yet delivered, the common case, go as
    sets: their attempts in one INSERT, their deliveries in one UPDATE (one
    ``UPDATE … FROM unnest`` on PostgreSQL, one ``executemany`` on SQLite),
    instead of four statements each. The rest go one by one.
    """
    out: list[dict[str, Any] | NotFound | None] = [None] * len(reports)
    rest = list(range(len(reports)))
    if len(reports) > 1:
        rest = []
        dialect = conn.dialect.name
        keys = {"keys": [r.key for r in reports]}
        recorded = set(conn.scalars(_RECORDED_KEYS[dialect], keys))
        rows = {
            row["id"]: dict(row)
            for row in conn.execute(
                _DELIVERIES_OF[dialect], {"ids": sorted({r.delivery_id for r in reports})}
            ).mappings()
        }
        delivered: list[tuple[int, DeliveryAttemptReport, Mapping[str, Any], int]] = []
        seen: set[str] = set()
        for index, report in enumerate(reports):
            row = rows.get(report.delivery_id)
            if (
                report.succeeded
                and row is not None
                and row["status"] != DeliveryStatus.DELIVERED.value
                and report.key not in recorded
                and report.delivery_id not in seen
                and report.key not in seen
            ):
                step = row["schedule_step"] + (1 if report.trigger == "schedule" else 0)
                delivered.append((index, report, row, step))
            else:
                rest.append(index)
            seen.update((report.delivery_id, report.key))
        if delivered:
            _record_delivered(conn, delivered, now)
            for index, _, _, step in delivered:
                out[index] = {"recorded": True, "next_attempt_in": None, "step": step}
    for index in rest:
        try:
            out[index] = record_attempt(conn, policy, reports[index], now)
        except NotFound as exc:
            out[index] = exc
    return [outcome for outcome in out if outcome is not None]


def _record_delivered(
    conn: sa.Connection,
    delivered: Sequence[tuple[int, DeliveryAttemptReport, Mapping[str, Any], int]],
    now: dt.datetime,
) -> None:
    attempts = [
        {
            "delivery_id": row["id"],
            "key": report.key,
            "number": row["attempts"] + 1,
            "trigger": report.trigger,
            "at": now,
            "succeeded": True,
            "status_code": report.status_code,
            "latency_ms": report.latency_ms,
            "response_body": report.response_body,
            "error": report.error,
            "error_code": report.error_code,
        }
        for _, report, row, _ in delivered
    ]
    if conn.dialect.name == "postgresql":
        arrays = {name: [a[name] for a in attempts] for name in _DELIVERED_ARRAYS}
        conn.execute(_INSERT_DELIVERED, {"at": now, **arrays})
    else:
        execute_many(conn, _INSERT_ATTEMPT, attempts)
    endpoint_ids = sorted({row["endpoint_id"] for _, _, row, _ in delivered} - {None})
    if endpoint_ids:
        execute_many(
            conn, _ENDPOINT_SUCCEEDED, [{"endpoint_id": e, "now": now} for e in endpoint_ids]
        )
    if conn.dialect.name != "postgresql":
        execute_many(
            conn,
            _DELIVERED_ONE,
            [
                {
                    "w_id": row["id"],
                    "v_attempts": row["attempts"] + 1,
                    "v_status_code": report.status_code,
                    "v_step": step,
                    "now": now,
                }
                for _, report, row, step in delivered
            ],
        )
        return
    conn.execute(
        _DELIVERED,
        {
            "now": now,
            "ids": [row["id"] for _, _, row, _ in delivered],
            "attempts": [row["attempts"] + 1 for _, _, row, _ in delivered],
            "status_codes": [report.status_code for _, report, _, _ in delivered],
            "steps": [step for _, _, _, step in delivered],
        },
    )


def note_failure(
    conn: sa.Connection,
    policy: RetryPolicy,
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
