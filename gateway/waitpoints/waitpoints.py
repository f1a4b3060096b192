"""Waitpoints: what a run waits for outside it, without holding a worker.

A waitpoint is ``WAITING`` until it is completed, by ``POST
/api/v1/waitpoints/{id}/complete`` (an API key) or by a POST of any JSON to its
signed URL (no key: the URL can be handed to a third party as its callback),
or until it times out. A workflow's ``wait`` node waits on one (the posted
body becomes the node's output); a ``delay`` node's completes by itself when
its time comes. Either way the workflow's next step is queued in the same
transaction, and a ``waitpoint.completed`` event goes to the endpoints that
want it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from db.ids import new_id
from db.rows import owned_row
from db.types import isoformat
from gateway.errors import Conflict, NotFound
from gateway.runs.durable import WAITPOINT_TIMED_OUT
from gateway.runs.effects import Effects
from gateway.runs.errors import RunNotFound
from gateway.runs.runs_table import runs
from gateway.runs.workflow import node_finished, waitpoints
from webhooks.outbox import create_event_deliveries

__all__ = [
    "TIMED_OUT_CODE",
    "WaitpointAlreadyCompleted",
    "WaitpointNotFound",
    "complete_waitpoint",
    "create_run_waitpoint",
    "create_waitpoint",
    "due_now",
    "due_waitpoints",
    "load_waitpoint",
]

#: The error code of a ``wait`` node (or ``token`` step) whose waitpoint timed out.
TIMED_OUT_CODE = WAITPOINT_TIMED_OUT


class WaitpointNotFound(NotFound):
    code = "waitpoint_not_found"

    def __init__(self, waitpoint_id: str) -> None:
        super().__init__(f"no waitpoint with id {waitpoint_id!r}")


class WaitpointAlreadyCompleted(Conflict):
    """A waitpoint completes once.

    :param status: the waitpoint's status (``COMPLETED`` or ``TIMED_OUT``)
    """

    code = "waitpoint_already_completed"

    def __init__(self, status: str) -> None:
        self.status = status
        super().__init__(f"the waitpoint is {status} already; it completes once")


def waitpoint_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """A waitpoint as the API shows it (the service adds its ``url``)."""
    return {
        "id": row["id"],
        "status": row["status"],
        "kind": row["kind"],
        "output": row["output"] if row["status"] == "COMPLETED" else None,
        "tags": list(row["tags"] or []),
        "idempotency_key": row["idempotency_key"],
        "run_id": row["run_id"],
        "node_id": row["node_id"],
        "expires_at": isoformat(row["timeout_at"]),
        "created_at": isoformat(row["created_at"]),
        "completed_at": isoformat(row["completed_at"]),
    }


def _find(conn: sa.Connection, project_id: str | None, waitpoint_id: str) -> dict[str, Any]:
    return owned_row(
        conn, waitpoints, waitpoint_id, project_id, WaitpointNotFound(waitpoint_id), for_update=True
    )


def load_waitpoint(
    conn: sa.Connection, project_id: str | None, waitpoint_id: str
) -> dict[str, Any]:
    """:raises WaitpointNotFound: no such waitpoint (in the project)"""
    return waitpoint_view(_find(conn, project_id, waitpoint_id))


def create_waitpoint(
    conn: sa.Connection,
    project_id: str,
    timeout: float | None,
    idempotency_key: str | None,
    tags: list[str],
    now: dt.datetime,
    run_id: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """A new waitpoint, or the one its idempotency key made before (``True``);
    ``run_id``: the durable task that made it (``ctx.create_waitpoint``), whose
    cancel cancels it."""
    if idempotency_key is not None:
        found = (
            conn.execute(
                sa.select(waitpoints).where(
                    waitpoints.c.project_id == project_id,
                    waitpoints.c.idempotency_key == idempotency_key,
                )
            )
            .mappings()
            .first()
        )
        if found is not None:
            return waitpoint_view(dict(found)), True
    row = {
        "id": new_id("wp"),
        "project_id": project_id,
        "status": "WAITING",
        "kind": "manual",
        "output": None,
        "idempotency_key": idempotency_key,
        "tags": tags,
        "timeout_at": now + dt.timedelta(seconds=timeout) if timeout else None,
        "run_id": run_id,
        "node_id": None,
        "created_at": now,
        "completed_at": None,
    }
    conn.execute(waitpoints.insert(), row)
    return waitpoint_view(row), False


def create_run_waitpoint(
    conn: sa.Connection,
    run_id: str,
    key: str,
    timeout: float | None,
    tags: list[str],
    now: dt.datetime,
) -> dict[str, Any]:
    """The waitpoint of a durable task's ``create_waitpoint`` step ``key``:
    made once per run and step, whichever execution asks.

    :raises RunNotFound: no such run
    """
    project_id = conn.scalar(sa.select(runs.c.project_id).where(runs.c.id == run_id))
    if project_id is None:
        raise RunNotFound(run_id)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    view, _ = create_waitpoint(
        conn, project_id, timeout, f"run:{run_id}:{digest}", tags, now, run_id=run_id
    )
    return view


def _end(
    conn: sa.Connection, row: dict[str, Any], status: str, output: Any, now: dt.datetime
) -> Effects:
    """End a waitpoint; its node moves on; the event goes out."""
    moved = conn.execute(
        waitpoints.update()
        .where(waitpoints.c.id == row["id"], waitpoints.c.status == "WAITING")
        .values(status=status, output=output, completed_at=now)
    )
    if moved.rowcount != 1:
        raise WaitpointAlreadyCompleted(str(row["status"]))
    ended = {**row, "status": status, "output": output, "completed_at": now}
    done = Effects()
    if row["run_id"] is not None and row["node_id"] is not None:
        completed = status == "COMPLETED"
        done.add(
            node_finished(
                conn,
                row["run_id"],
                row["node_id"],
                now,
                completed=completed,
                output=output,
                error_code=None if completed else TIMED_OUT_CODE,
                error_message=None if completed else "the waitpoint timed out",
            )
        )
    if status == "COMPLETED":
        done.outgoing.extend(
            create_event_deliveries(
                conn, row["project_id"], "waitpoint.completed", waitpoint_view(ended), now
            )
        )
    return done


def complete_waitpoint(
    conn: sa.Connection,
    project_id: str | None,
    waitpoint_id: str,
    output: Any,
    now: dt.datetime,
) -> tuple[dict[str, Any], Effects]:
    """Complete it with ``output``; ``project_id=None``: through its signed URL.

    :raises WaitpointNotFound: no such waitpoint (in the project)
    :raises WaitpointAlreadyCompleted: it is not WAITING
    """
    row = _find(conn, project_id, waitpoint_id)
    if row["status"] != "WAITING":
        raise WaitpointAlreadyCompleted(str(row["status"]))
    effects = _end(conn, row, "COMPLETED", output, now)
    return load_waitpoint(conn, None, waitpoint_id), effects


def _due(now: dt.datetime | sa.BindParameter[Any]) -> sa.ColumnElement[bool]:
    return sa.and_(waitpoints.c.status == "WAITING", waitpoints.c.timeout_at <= now)


def due_now(now: dt.datetime | sa.BindParameter[Any]) -> sa.ColumnElement[bool]:
    """Whether :func:`due_waitpoints` has a waitpoint to end at ``now``."""
    return sa.exists().where(_due(now))


def due_waitpoints(conn: sa.Connection, now: dt.datetime, limit: int = 200) -> Effects:
    """Delays whose time came complete (passing on their input); waits past
    their timeout end ``TIMED_OUT`` (their node fails)."""
    rows = conn.execute(
        sa.select(waitpoints)
        .where(_due(now))
        .order_by(waitpoints.c.timeout_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).mappings()
    done = Effects()
    for row in [dict(r) for r in rows]:
        if row["kind"] == "delay":
            output = {"waited_until": isoformat(row["timeout_at"]), **(row["output"] or {})}
            done.add(_end(conn, row, "COMPLETED", output, now))
        else:
            done.add(_end(conn, row, "TIMED_OUT", None, now))
    return done


def list_waitpoints(
    conn: sa.Connection,
    project_id: str,
    limit: int,
    cursor: str | None,
    statuses: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A page of the project's waitpoints, newest first (IDs sort by time),
    optionally of some statuses; ``next_cursor`` is the last one's ID."""
    where = [waitpoints.c.project_id == project_id]
    if statuses:
        where.append(waitpoints.c.status.in_(statuses))
    if cursor:
        where.append(waitpoints.c.id < cursor)
    rows = (
        conn.execute(
            sa.select(waitpoints).where(*where).order_by(waitpoints.c.id.desc()).limit(limit + 1)
        )
        .mappings()
        .all()
    )
    page = [waitpoint_view(dict(r)) for r in rows[:limit]]
    return {"data": page, "next_cursor": page[-1]["id"] if len(rows) > limit else None}
