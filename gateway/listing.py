"""Listing runs (filters, cursor pages) and summing up batches."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from db.models import Batch, Run, RunStatus, RunTransition
from db.types import isoformat
from gateway.transitions import run_view

__all__ = ["RunQuery", "batch_summary", "count_by_status", "list_runs", "transitions_since"]

runs = Run.__table__  # type: ignore[attr-defined]
batches = Batch.__table__  # type: ignore[attr-defined]
run_transitions = RunTransition.__table__  # type: ignore[attr-defined]


def transitions_since(conn: sa.Connection, run_id: str, after: int) -> list[dict[str, Any]]:
    """The run's status changes after the one with ID ``after``, in order."""
    rows = conn.execute(
        sa.select(run_transitions)
        .where(run_transitions.c.run_id == run_id, run_transitions.c.id > after)
        .order_by(run_transitions.c.id)
    ).mappings()
    return [dict(r) for r in rows]


@dataclasses.dataclass(frozen=True)
class RunQuery:
    statuses: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    tag: str | None = None
    created_after: dt.datetime | None = None
    created_before: dt.datetime | None = None
    limit: int = 25
    #: The ID of the last run of the previous page.
    cursor: str | None = None


def _has_tag(conn: sa.Connection, tag: str) -> Any:
    if conn.dialect.name == "postgresql":
        return runs.c.tags.op("@>")(sa.func.jsonb_build_array(tag))
    each = sa.func.json_each(runs.c.tags).table_valued("value")
    return sa.exists(sa.select(1).select_from(each).where(each.c.value == tag))


def list_runs(conn: sa.Connection, project_id: str, query: RunQuery) -> dict[str, Any]:
    """Newest first. IDs sort by creation time, so "older than the cursor" pages
    stay stable while new runs arrive."""
    where = [runs.c.project_id == project_id]
    if query.statuses:
        where.append(runs.c.status.in_(query.statuses))
    if query.tasks:
        where.append(runs.c.task.in_(query.tasks))
    if query.tag:
        where.append(_has_tag(conn, query.tag))
    if query.created_after:
        where.append(runs.c.created_at > query.created_after)
    if query.created_before:
        where.append(runs.c.created_at < query.created_before)
    if query.cursor:
        where.append(runs.c.id < query.cursor)
    rows = [
        dict(r)
        for r in conn.execute(
            sa.select(runs).where(*where).order_by(runs.c.id.desc()).limit(query.limit + 1)
        ).mappings()
    ]
    page = rows[: query.limit]
    return {
        "data": [run_view(r, []) for r in page],
        "next_cursor": page[-1]["id"] if len(rows) > query.limit else None,
    }


def count_by_status(conn: sa.Connection, condition: Any) -> dict[str, int]:
    """How many runs matching ``condition`` are in each status (every status listed)."""
    counts = {s.value: 0 for s in RunStatus}
    for status, count in conn.execute(
        sa.select(runs.c.status, sa.func.count()).where(condition).group_by(runs.c.status)
    ):
        counts[status] = int(count)
    return counts


def batch_summary(conn: sa.Connection, project_id: str, batch_id: str) -> dict[str, Any] | None:
    batch = (
        conn.execute(
            sa.select(batches).where(batches.c.id == batch_id, batches.c.project_id == project_id)
        )
        .mappings()
        .first()
    )
    if batch is None:
        return None
    counts = count_by_status(conn, runs.c.batch_id == batch_id)
    run_ids = (
        conn.execute(sa.select(runs.c.id).where(runs.c.batch_id == batch_id).order_by(runs.c.id))
        .scalars()
        .all()
    )
    final = sum(counts[s.value] for s in RunStatus if s.is_final)
    return {
        "id": batch["id"],
        "count": batch["count"],
        "counts": counts,
        "is_final": final == batch["count"],
        "created_at": isoformat(batch["created_at"]),
        "run_ids": list(run_ids),
    }
