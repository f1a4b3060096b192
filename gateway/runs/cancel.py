"""Canceling a run: from any status that is not final, with a workflow's children."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from db.models import RunStatus, Waitpoint
from db.types import utcnow
from gateway.runs.effects import Effects
from gateway.runs.errors import RunAlreadyFinal, RunNotFound
from gateway.runs.read import view_of
from gateway.runs.runs_table import run_attempts, run_nodes, runs, select_run, transition
from gateway.runs.workflow import child_finished
from jobs.protocol import run_job_id
from webhooks.outbox import create_run_deliveries

__all__ = ["cancel_open_run", "cancel_run"]

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
