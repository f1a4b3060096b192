"""What the dashboard reads beyond the API's own views: counts, history, the live feed.

Each function takes a connection (``Database.read`` runs it) and is scoped to
one project: no function here can see another project's rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from db.models import Artifact, Delivery, DeliveryAttempt, Run, RunTransition
from db.types import isoformat
from gateway.runs.read import count_by_status

__all__ = [
    "Cursor",
    "FeedRead",
    "endpoint_stats",
    "feed",
    "feed_cursor",
    "run_artifacts",
    "run_history",
    "status_counts",
]

runs = Run.__table__  # type: ignore[attr-defined]
run_transitions = RunTransition.__table__  # type: ignore[attr-defined]
artifacts = Artifact.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
delivery_attempts = DeliveryAttempt.__table__  # type: ignore[attr-defined]

#: The most feed entries one read hands back; the next read goes on from there.
FEED_BATCH = 500


def status_counts(conn: sa.Connection, project_id: str) -> dict[str, int]:
    """How many of the project's runs are in each status (every status listed)."""
    return count_by_status(conn, runs.c.project_id == project_id)


def run_history(conn: sa.Connection, project_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every status change of the run, oldest first."""
    rows = conn.execute(
        sa.select(run_transitions)
        .select_from(run_transitions.join(runs, runs.c.id == run_transitions.c.run_id))
        .where(run_transitions.c.run_id == run_id, runs.c.project_id == project_id)
        .order_by(run_transitions.c.id)
    ).mappings()
    return [
        {
            "from": r["from_status"],
            "to": r["to_status"],
            "attempt": r["attempt"],
            "at": isoformat(r["at"]),
        }
        for r in rows
    ]


def run_replays(conn: sa.Connection, project_id: str, run_id: str) -> list[str]:
    """The runs that replay this one, newest first (ten at most)."""
    return list(
        conn.scalars(
            sa.select(runs.c.id)
            .where(runs.c.replayed_from == run_id, runs.c.project_id == project_id)
            .order_by(runs.c.id.desc())
            .limit(10)
        )
    )


def run_artifacts(conn: sa.Connection, project_id: str, run_id: str) -> list[dict[str, Any]]:
    """The files the run made, and its children (a workflow's nodes) made."""
    children = sa.select(runs.c.id).where(runs.c.parent_id == run_id)
    rows = conn.execute(
        sa.select(artifacts)
        .where(
            artifacts.c.project_id == project_id,
            sa.or_(artifacts.c.run_id == run_id, artifacts.c.run_id.in_(children)),
        )
        .order_by(artifacts.c.created_at)
        .limit(50)
    ).mappings()
    return [dict(r) for r in rows]


def endpoint_stats(
    conn: sa.Connection, project_id: str, since: dt.datetime
) -> dict[str, dict[str, int]]:
    """Per endpoint: the delivery attempts since ``since`` and how many succeeded."""
    succeeded = sa.func.sum(sa.case((delivery_attempts.c.succeeded, 1), else_=0))
    rows = conn.execute(
        sa.select(deliveries.c.endpoint_id, sa.func.count(), succeeded)
        .select_from(
            delivery_attempts.join(deliveries, deliveries.c.id == delivery_attempts.c.delivery_id)
        )
        .where(
            deliveries.c.project_id == project_id,
            deliveries.c.endpoint_id.is_not(None),
            delivery_attempts.c.at >= since,
        )
        .group_by(deliveries.c.endpoint_id)
    )
    return {
        endpoint_id: {"attempts": int(total), "succeeded": int(ok or 0)}
        for endpoint_id, total, ok in rows
    }


_MAX_ID = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Cursor:
    """A position in the live feed: the highest status change and delivery attempt IDs."""

    transition: int = 0
    attempt: int = 0

    def __str__(self) -> str:
        return f"{self.transition}.{self.attempt}"

    @classmethod
    def parse(cls, raw: str | None) -> Cursor | None:
        transition, _, attempt = (raw or "").partition(".")
        # Digits only, and few enough to fit a BIGINT.
        if not all(p.isascii() and p.isdigit() and len(p) <= 18 for p in (transition, attempt)):
            return None
        # The IDs are INTEGERs: PostgreSQL would refuse a larger number
        # outright (the stream takes a position past its head as the head).
        return cls(min(int(transition), _MAX_ID), min(int(attempt), _MAX_ID))

    def at_most(self, other: Cursor) -> Cursor:
        return Cursor(min(self.transition, other.transition), min(self.attempt, other.attempt))

    def back(self, by: int) -> Cursor:
        return Cursor(max(0, self.transition - by), max(0, self.attempt - by))


def feed_cursor(conn: sa.Connection) -> Cursor:
    """The feed's head now: a page rendered now shows everything up to here."""
    return Cursor(
        int(conn.scalar(sa.select(sa.func.max(run_transitions.c.id))) or 0),
        int(conn.scalar(sa.select(sa.func.max(delivery_attempts.c.id))) or 0),
    )


@dataclasses.dataclass(frozen=True)
class FeedRead:
    head: Cursor
    #: ``(kind, id, run ID)``: ``("run", transition ID, …)`` or ``("delivery", attempt ID, …)``.
    entries: list[tuple[str, int, str | None]]


def feed(conn: sa.Connection, project_id: str, low: Cursor, run_id: str | None = None) -> FeedRead:
    """The project's status changes and delivery attempts with IDs above ``low``
    and up to the head (read first, so nothing committed meanwhile is skipped
    for good). With ``run_id``: only that run, its children and its deliveries.

    IDs are handed out before commit, so on PostgreSQL a row may appear below
    an ID already read; callers re-read a window below the head (see
    :mod:`gateway.dashboard.stream`) and drop the IDs they have seen.
    """
    head = feed_cursor(conn)
    where = [
        run_transitions.c.id > low.transition,
        run_transitions.c.id <= head.transition,
        runs.c.project_id == project_id,
    ]
    if run_id is not None:
        where.append(sa.or_(runs.c.id == run_id, runs.c.parent_id == run_id))
    changes = conn.execute(
        sa.select(run_transitions.c.id, runs.c.id)
        .select_from(run_transitions.join(runs, runs.c.id == run_transitions.c.run_id))
        .where(*where)
        # Newest first: past a full batch, the oldest (most likely seen) go.
        .order_by(run_transitions.c.id.desc())
        .limit(FEED_BATCH)
    ).all()
    where = [
        delivery_attempts.c.id > low.attempt,
        delivery_attempts.c.id <= head.attempt,
        deliveries.c.project_id == project_id,
    ]
    if run_id is not None:
        where.append(deliveries.c.run_id == run_id)
    attempts = conn.execute(
        sa.select(delivery_attempts.c.id, deliveries.c.run_id)
        .select_from(
            delivery_attempts.join(deliveries, deliveries.c.id == delivery_attempts.c.delivery_id)
        )
        .where(*where)
        .order_by(delivery_attempts.c.id.desc())
        .limit(FEED_BATCH)
    ).all()
    return FeedRead(
        head=head,
        entries=[("run", int(i), r) for i, r in changes]
        + [("delivery", int(i), r) for i, r in attempts],
    )
