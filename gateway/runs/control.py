"""What a caller changes on a run: canceling it (from any status that is not
final, with a workflow's children), its tags and its metadata."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from db.models import RunStatus, Waitpoint
from db.rows import owned_row
from db.types import utcnow
from gateway.errors import ValidationFailed
from gateway.runs.effects import Effects
from gateway.runs.errors import RunAlreadyFinal, RunNotFound
from gateway.runs.read import view_of
from gateway.runs.runs_table import run_attempts, run_nodes, runs, select_run, transition
from gateway.runs.workflow import child_finished
from jobs.protocol import run_job_id
from webhooks.outbox import create_run_deliveries

__all__ = ["add_tags", "cancel_open_run", "cancel_run", "update_metadata"]

#: The most tags a run has (as at trigger time).
MAX_TAGS = 10

_FINAL = [s.value for s in RunStatus if s.is_final]
waitpoints = Waitpoint.__table__  # type: ignore[attr-defined]


def _cancel(
    conn: sa.Connection, run: dict[str, Any], now: dt.datetime, done: Effects, *, from_parent: bool
) -> None:
    transition(conn, run, RunStatus.CANCELED, now, {"finished_at": now, "step_pending": False})
    conn.execute(
        run_attempts.update()
        .where(run_attempts.c.run_id == run["id"], run_attempts.c.finished_at.is_(None))
        .values(status=RunStatus.CANCELED.value, finished_at=now)
    )
    done.abort.append(run_job_id(run["id"], run["attempt"], run["step"]))
    # What it waited on ends with it: its waitpoints' URLs answer 409 from
    # now on, and its waiting or running nodes say they were canceled.
    conn.execute(
        waitpoints.update()
        .where(waitpoints.c.run_id == run["id"], waitpoints.c.status == "WAITING")
        .values(status="CANCELED", completed_at=now)
    )
    conn.execute(
        run_nodes.update()
        .where(run_nodes.c.parent_id == run["id"], run_nodes.c.status.in_(("waiting", "running")))
        .values(status="canceled", updated_at=now)
    )
    done.changed.append(run["id"])
    done.finished.append(run["id"])
    done.outgoing.extend(
        create_run_deliveries(conn, run, lambda: view_of(conn, run), "run.canceled", now)
    )
    children = conn.execute(
        sa.select(runs.c.id).where(runs.c.parent_id == run["id"], runs.c.status.not_in(_FINAL))
    ).scalars()
    for child_id in list(children):
        child = select_run(conn, child_id, lock=True)
        if child is not None and not RunStatus(child["status"]).is_final:
            _cancel(conn, child, now, done, from_parent=True)
    if run["parent_id"] is not None and not from_parent:
        done.add(
            child_finished(
                conn,
                run,
                RunStatus.CANCELED,
                now,
                error_code="canceled",
                error_message="the run was canceled",
            )
        )


def cancel_run(conn: sa.Connection, project_id: str, run_id: str) -> Effects:
    """Cancel a run and, for a workflow, its children.

    :raises RunNotFound: no such run in the project
    :raises RunAlreadyFinal: the run is final already
    """
    run = select_run(conn, run_id, lock=True)
    if run is None or run["project_id"] != project_id:
        raise RunNotFound(run_id)
    if RunStatus(run["status"]).is_final:
        raise RunAlreadyFinal(str(run["status"]))
    done = Effects()
    _cancel(conn, run, utcnow(), done, from_parent=False)
    return done


def cancel_open_run(conn: sa.Connection, run_id: str, now: dt.datetime, done: Effects) -> bool:
    """Cancel the run (and a workflow's children) unless it is final already;
    whether it did (a bulk cancel's step)."""
    run = select_run(conn, run_id, lock=True)
    if run is None or RunStatus(run["status"]).is_final:
        return False
    _cancel(conn, run, now, done, from_parent=False)
    return True


def _owned(conn: sa.Connection, project_id: str, run_id: str) -> dict[str, Any]:
    """The run, locked for this transaction; another project's is not found."""
    return owned_row(conn, runs, run_id, project_id, RunNotFound(run_id), for_update=True)


def add_tags(conn: sa.Connection, project_id: str, run_id: str, tags: list[str]) -> list[str]:
    """Add ``tags`` to the run's (each once, in order); its tags after.

    :raises RunNotFound: no such run in the project
    :raises ValidationFailed: more than :data:`MAX_TAGS` in all
    """
    run = _owned(conn, project_id, run_id)
    merged = list(dict.fromkeys([*(run["tags"] or []), *tags]))
    if len(merged) > MAX_TAGS:
        raise ValidationFailed(
            f"a run has at most {MAX_TAGS} tags",
            details=[{"path": "tags", "type": "too_long", "message": f"{len(merged)} in all"}],
        )
    conn.execute(runs.update().where(runs.c.id == run_id).values(tags=merged, updated_at=utcnow()))
    return merged


def _apply(metadata: dict[str, Any], operation: dict[str, Any]) -> None:
    """One change to a run's metadata: ``set``, ``delete``, ``append`` (to a
    list), ``remove`` (from a list), ``increment`` (a number), ``update``
    (merge an object). Keys are top-level."""
    kind, key, value = operation.get("type"), operation.get("key"), operation.get("value")
    if kind == "update" and isinstance(value, dict):
        metadata.update(value)
    elif not isinstance(key, str) or not key:
        raise ValueError(f"a {kind!r} operation needs a key")
    elif kind == "set":
        metadata[key] = value
    elif kind == "delete":
        metadata.pop(key, None)
    elif kind == "append":
        current = metadata.get(key)
        metadata[key] = [
            *(current if isinstance(current, list) else [] if current is None else [current]),
            value,
        ]
    elif kind == "remove":
        current = metadata.get(key)
        if isinstance(current, list):
            metadata[key] = [item for item in current if item != value]
    elif kind == "increment" and isinstance(value, (int, float)) and not isinstance(value, bool):
        current = metadata.get(key, 0)
        if not isinstance(current, (int, float)) or isinstance(current, bool):
            raise ValueError(f"{key!r} is not a number")
        metadata[key] = current + value
    else:
        raise ValueError(f"unknown operation {kind!r}")


def update_metadata(
    conn: sa.Connection,
    project_id: str,
    run_id: str,
    replace: dict[str, Any] | None,
    operations: list[dict[str, Any]],
) -> dict[str, Any]:
    """Replace the run's metadata (``replace``), then apply ``operations`` in
    order; the metadata after.

    :raises RunNotFound: no such run in the project
    :raises ValidationFailed: an operation that does not apply (path ``operations.N``)
    """
    run = _owned(conn, project_id, run_id)
    metadata = dict(replace if replace is not None else run["metadata"] or {})
    for i, operation in enumerate(operations):
        try:
            _apply(metadata, operation)
        except ValueError as exc:
            raise ValidationFailed(
                str(exc),
                details=[{"path": f"operations.{i}", "type": "operation", "message": str(exc)}],
            ) from None
    conn.execute(
        runs.update().where(runs.c.id == run_id).values(metadata=metadata, updated_at=utcnow())
    )
    return metadata
