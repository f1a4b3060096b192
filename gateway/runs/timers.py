"""Time: delays and retries that come due, TTLs that run out, rescheduling."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from db.models import RunStatus
from db.types import utcnow
from gateway.queues.admission import admit
from gateway.queues.slots import QueueRule
from gateway.runs.effects import Effects
from gateway.runs.errors import RunNotDelayed, RunNotFound
from gateway.runs.read import run_job, view_of
from gateway.runs.runs_table import runs, select_run, transition
from jobs.protocol import run_job_id
from webhooks.outbox import Outgoing, create_run_deliveries

__all__ = ["backoff", "due_now", "expire", "expired", "release_due", "reschedule"]


def backoff(retry: Mapping[str, Any] | None, attempt: int) -> float:
    """Seconds before the attempt after ``attempt`` (exponential, capped, jittered)."""
    options = {"factor": 2.0, "min_delay": 1.0, "max_delay": 60.0, "jitter": 0.2, **(retry or {})}
    delay = min(options["max_delay"], options["min_delay"] * options["factor"] ** (attempt - 1))
    jitter = options["jitter"]
    return float(max(0.0, delay * (1 + random.uniform(-jitter, jitter))))


def expired(run: Mapping[str, Any], now: dt.datetime) -> bool:
    """Whether the run's TTL ran out before its first attempt started."""
    return run.get("expire_at") is not None and run["attempt"] == 1 and now >= run["expire_at"]


def expire(conn: sa.Connection, run: dict[str, Any], now: dt.datetime) -> list[Outgoing]:
    """End ``run`` EXPIRED; the callbacks that causes."""
    transition(
        conn,
        run,
        RunStatus.EXPIRED,
        now,
        {
            "finished_at": now,
            "error_code": "expired",
            "error_message": "the run was not started within its TTL",
        },
    )
    return create_run_deliveries(conn, run, lambda: view_of(conn, run), "run.expired", now)


def _due(conn: sa.Connection, condition: Any, limit: int) -> list[str]:
    return list(conn.execute(sa.select(runs.c.id).where(condition).limit(limit)).scalars())


_WAITING = (RunStatus.QUEUED.value, RunStatus.DELAYED.value)
_LATER = (RunStatus.DELAYED.value, RunStatus.RETRYING.value)
_When = dt.datetime | sa.BindParameter[Any]


# Each says ``IS NOT NULL`` though the comparison implies it: PostgreSQL's
# generic plan (the statement is prepared, its time a parameter) guesses a
# third of the rows for ``<= $1`` whatever the column holds, and so read the
# whole runs table for a run that is not there, the reconciler's probe several
# times a second (33 ms at 60,000 runs, docs/performance.md). The null
# fraction it knows for ``IS NOT NULL`` sends it through the partial index
# (``ix_runs_status_expire_at``, ``ix_runs_status_run_at``), which holds only
# the runs with a TTL or a time to start.
def _expiring(now: _When) -> sa.ColumnElement[bool]:
    """Runs waiting to start whose TTL ran out."""
    return sa.and_(
        runs.c.status.in_(_WAITING), runs.c.expire_at.is_not(None), runs.c.expire_at <= now
    )


def _starting(now: _When) -> sa.ColumnElement[bool]:
    """Delayed and retrying runs whose time came."""
    return sa.and_(runs.c.status.in_(_LATER), runs.c.run_at.is_not(None), runs.c.run_at <= now)


def due_now(now: _When) -> sa.ColumnElement[bool]:
    """Whether :func:`release_due` has anything to do at ``now`` (for a read
    that looks before a write unit is opened)."""
    return sa.or_(sa.exists().where(_expiring(now)), sa.exists().where(_starting(now)))


def release_due(conn: sa.Connection, now: dt.datetime, limit: int = 200) -> Effects:
    """Move DELAYED and RETRYING runs whose time has come to QUEUED, and end
    QUEUED or DELAYED runs whose TTL ran out as EXPIRED."""
    done = Effects()
    for run_id in _due(conn, _expiring(now), limit):
        run = select_run(conn, run_id, lock=True)
        if run is None or run["status"] not in _WAITING:
            continue
        done.outgoing.extend(expire(conn, run, now))
        done.abort.append(run_job_id(run["id"], run["attempt"], run["step"]))
        done.changed.append(run["id"])
        done.finished.append(run["id"])
    rules: dict[tuple[str, str], QueueRule] = {}
    for run_id in _due(conn, _starting(now), limit):
        run = select_run(conn, run_id, lock=True)
        if run is None or run["status"] not in _LATER:
            continue
        gate: dict[str, Any] = {"queue": run["queue"], "project_id": run["project_id"]}
        starts = admit(conn, {**gate, "task": run["task"]}, rules)
        transition(
            conn,
            run,
            RunStatus.QUEUED,
            now,
            {"run_at": None, "gated": not starts, "held": not starts},
        )
        if starts:
            done.jobs.append(run_job(conn, run))
        done.changed.append(run["id"])
    return done


def reschedule(conn: sa.Connection, project_id: str, run_id: str, run_at: dt.datetime) -> None:
    """Move a DELAYED run's start.

    :raises RunNotFound: no such run in the project
    :raises RunNotDelayed: the run is not DELAYED
    """
    run = select_run(conn, run_id, lock=True)
    if run is None or run["project_id"] != project_id:
        raise RunNotFound(run_id)
    if run["status"] != RunStatus.DELAYED:
        raise RunNotDelayed(str(run["status"]))
    conn.execute(
        runs.update()
        .where(runs.c.id == run_id, runs.c.status == RunStatus.DELAYED.value)
        .values(run_at=run_at, updated_at=utcnow())
    )
