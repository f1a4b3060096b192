"""Queues as the API shows them: configured ones, those runs are in, each task's own.

A queue nobody configured has no row: it has no limit and is not paused. A
row is made by ``POST /api/v1/queues``, by a PATCH of a queue that had none,
and by the first run of a task that declares a limit. A queue that a trigger
names (``options.queue``) and nobody configured is listed while runs are in
it. The list comes in pages, by name.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from db.models import RunStatus
from db.types import isoformat
from gateway.errors import Conflict, NotFound
from gateway.queues.admission import request_pump
from gateway.queues.slots import default_queue, insert_queue, queues, select_queue
from gateway.runs.runs_table import runs
from jobs.tasks.registry import registry

__all__ = [
    "QueueExists",
    "QueueNotFound",
    "create_queue",
    "get_queue",
    "list_queues",
    "task_queues",
    "update_queue",
]

_QUEUED = RunStatus.QUEUED.value
_EXECUTING = RunStatus.EXECUTING.value


class QueueNotFound(NotFound):
    code = "queue_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no queue named {name!r}")


class QueueExists(Conflict):
    code = "queue_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"a queue named {name!r} exists already; PATCH it to change it")


def _counts(
    conn: sa.Connection, project_id: str, name: str | None = None
) -> dict[str, dict[str, int]]:
    where = [runs.c.project_id == project_id, runs.c.status.in_((_QUEUED, _EXECUTING))]
    if name is not None:
        where.append(runs.c.queue == name)
    counts: dict[str, dict[str, int]] = {}
    for queue, status, count in conn.execute(
        sa.select(runs.c.queue, runs.c.status, sa.func.count())
        .where(*where)
        .group_by(runs.c.queue, runs.c.status)
    ):
        entry = counts.setdefault(queue, {"queued": 0, "running": 0})
        entry["queued" if status == _QUEUED else "running"] += int(count)
    return counts


def _view(
    name: str, row: Mapping[str, Any] | None, counts: Mapping[str, int] | None, limit: int | None
) -> dict[str, Any]:
    return {
        "name": name,
        "concurrency_limit": row["concurrency_limit"] if row is not None else limit,
        "paused": bool(row["paused"]) if row is not None else False,
        "queued": (counts or {}).get("queued", 0),
        "running": (counts or {}).get("running", 0),
        "created_at": isoformat(row["created_at"]) if row is not None else None,
        "updated_at": isoformat(row["updated_at"]) if row is not None else None,
    }


def task_queues() -> dict[str, int | None]:
    """Every registered task's own queue, with its declared limit."""
    declared: dict[str, int | None] = {}
    for task in registry.names():
        name, limit = default_queue(task)
        if declared.get(name) is None:
            declared[name] = limit
    return declared


def list_queues(
    conn: sa.Connection, project_id: str, limit: int = 1000, after: str | None = None
) -> dict[str, Any]:
    """A page of the project's queues: those it configured, those its runs
    are in, and each task's own; by name, from after ``after``."""
    rows = {
        r["name"]: dict(r)
        for r in conn.execute(sa.select(queues).where(queues.c.project_id == project_id)).mappings()
    }
    counts = _counts(conn, project_id)
    declared = task_queues()
    names = sorted(n for n in {*rows, *counts, *declared} if after is None or n > after)
    page = names[:limit]
    return {
        "data": [_view(n, rows.get(n), counts.get(n), declared.get(n)) for n in page],
        "next_cursor": page[-1] if len(names) > limit else None,
    }


def get_queue(conn: sa.Connection, project_id: str, name: str) -> dict[str, Any]:
    """:raises QueueNotFound: not configured, no run in it, and no task's own"""
    row = conn.execute(select_queue, {"project_id": project_id, "name": name}).mappings().first()
    counts = _counts(conn, project_id, name).get(name)
    declared = task_queues()
    if row is None and counts is None and name not in declared:
        raise QueueNotFound(name)
    return _view(name, dict(row) if row is not None else None, counts, declared.get(name))


def create_queue(
    conn: sa.Connection, project_id: str, name: str, limit: int | None, paused: bool
) -> dict[str, Any]:
    """:raises QueueExists: the project has a queue of that name configured"""
    if conn.execute(select_queue, {"project_id": project_id, "name": name}).first() is not None:
        raise QueueExists(name)
    now = dt.datetime.now(dt.UTC)
    conn.execute(
        queues.insert(),
        {
            "project_id": project_id,
            "name": name,
            "concurrency_limit": limit,
            "paused": paused,
            "created_at": now,
            "updated_at": now,
        },
    )
    request_pump(conn, project_id, name)
    return get_queue(conn, project_id, name)


def update_queue(
    conn: sa.Connection, project_id: str, name: str, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """Change a queue's limit or pause it (a queue with no row gets one); a
    raised limit or a resume hands out held runs at once.

    :raises QueueNotFound: no such queue (not configured, no runs, no task's own)
    """
    get_queue(conn, project_id, name)
    now = dt.datetime.now(dt.UTC)
    row = conn.execute(select_queue, {"project_id": project_id, "name": name}).mappings().first()
    if row is None:
        insert_queue(
            conn,
            {
                "project_id": project_id,
                "name": name,
                "concurrency_limit": task_queues().get(name),
                "paused": False,
                "created_at": now,
                "updated_at": now,
            },
        )
    values = {k: v for k, v in changes.items() if k in ("concurrency_limit", "paused")}
    conn.execute(
        queues.update()
        .where(queues.c.project_id == project_id, queues.c.name == name)
        .values(updated_at=now, **values)
    )
    request_pump(conn, project_id, name)
    return get_queue(conn, project_id, name)
