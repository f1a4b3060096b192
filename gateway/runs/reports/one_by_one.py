"""A worker's reports: an attempt started, ended (completed, failed), or is alive.

Each report is a compare-and-set against the attempt (and workflow step) it
names: a duplicate, late or replayed report changes nothing and still gets an
answer, so workers retry reports freely (docs/architecture.md, invariant 3).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from db.engine import savepoint
from db.models import RunStatus
from db.types import utcnow
from gateway.errors import APIError
from gateway.runs.durable import apply_suspend, record_steps
from gateway.runs.effects import Effects, EventAnswer
from gateway.runs.errors import LostRace, RunNotFound
from gateway.runs.read import view_of
from gateway.runs.reports.as_sets import apply_in_sets
from gateway.runs.runs_table import (
    ACTIVE,
    FINISH_ATTEMPT,
    INSERT_ATTEMPT,
    KeepFirst,
    is_current,
    runs,
    select_run,
    transition,
)
from gateway.runs.timers import backoff, expire, expired
from gateway.runs.workflow import apply_waiting, child_finished
from jobs.protocol import TIMED_OUT_CODE, WORKFLOW_TASK, WorkerEvent
from webhooks.outbox import FINAL_EVENTS, create_run_deliveries

__all__ = ["EventAnswer", "apply_event", "apply_events", "apply_final"]


def apply_event(conn: sa.Connection, event: WorkerEvent) -> EventAnswer:
    """Apply one worker report.

    :raises RunNotFound: no such run
    :raises InvalidEvent: a report that makes no sense for its run
    """
    run = select_run(conn, event.run_id, lock=event.type == "waiting")
    if run is None:
        raise RunNotFound(event.run_id)
    now = utcnow()
    if event.type == "started":
        return _apply_started(conn, event, run, now)
    if event.type == "waiting":
        wait = apply_waiting if run["task"] == WORKFLOW_TASK else apply_suspend
        applied, status, effects = wait(conn, event, run, now)
        return EventAnswer(applied, status.value, False, effects)
    if event.type == "heartbeat":
        return _apply_heartbeat(conn, event, run, now)
    return apply_final(conn, event, run, now)


def apply_events(
    conn: sa.Connection, events: Sequence[WorkerEvent], *, isolated: bool = False
) -> list[EventAnswer | APIError | LostRace]:
    """Apply a batch of reports in one transaction.

    Not ``isolated``, the common reports go as sets (``as_sets``), and a
    refused report (an :class:`APIError`) or one that lost a race
    (:class:`LostRace`) fails the whole unit, undone, and the caller
    runs it again ``isolated``: each report in a savepoint of its own, so one
    refused or lost leaves the others applied (and a lost one is handed back
    to run again). Refusals are rare; a savepoint costs two round trips to
    PostgreSQL per report.
    """
    if not isolated:  # the common reports as sets (``as_sets``)
        return list(apply_in_sets(conn, events, apply_event))
    # Runs are locked in ID order, whatever order the reports came in, so two
    # batches that touch the same runs wait for each other instead of
    # deadlocking (PostgreSQL would fail one; the writer runs it again). The
    # answers keep the reports' order.
    order = sorted(range(len(events)), key=lambda i: events[i].run_id)
    out: list[EventAnswer | APIError | LostRace | None] = [None] * len(events)
    for i in order:
        try:
            with savepoint(conn):
                out[i] = apply_event(conn, events[i])
        except (APIError, LostRace) as exc:
            out[i] = exc
    return [answer for answer in out if answer is not None]


def _apply_started(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> EventAnswer:
    status = RunStatus(run["status"])
    current = is_current(run, event)
    if current and status == RunStatus.QUEUED and expired(run, now):
        # Its TTL ran out while it waited in the queue: it never executes.
        outgoing = expire(conn, run, now)
        effects = Effects(outgoing=outgoing, changed=[run["id"]], finished=[run["id"]])
        return EventAnswer(True, RunStatus.EXPIRED.value, False, effects)
    if not (current and status == RunStatus.QUEUED) or run["held"]:
        # A re-delivered job of the attempt that is running may go on (execution
        # is at-least-once); anything else must not run, nor may a job of a
        # run its queue holds (a stray job must not take a slot it has not got).
        return EventAnswer(False, status.value, current and status == RunStatus.EXECUTING)
    transition(
        conn,
        run,
        RunStatus.EXECUTING,
        now,
        {"started_at": KeepFirst(now), "heartbeat_at": now},
    )
    effects = Effects(changed=[run["id"]])
    if run["step"] == 0:  # a workflow's later steps are not new attempts
        conn.execute(
            INSERT_ATTEMPT,
            {
                "run_id": run["id"],
                "number": event.attempt,
                "status": RunStatus.EXECUTING.value,
                "worker_id": event.worker_id,
                "started_at": now,
            },
        )
        effects.outgoing.extend(
            create_run_deliveries(conn, run, lambda: view_of(conn, run), "run.started", now)
        )
    return EventAnswer(True, RunStatus.EXECUTING.value, True, effects)


def apply_final(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> EventAnswer:
    """An attempt ended: COMPLETED, FAILED or TIMED_OUT, or RETRYING while
    attempts remain for a retryable error; a child's end moves its workflow."""
    status = RunStatus(run["status"])
    if not (is_current(run, event) and status in ACTIVE):
        return EventAnswer(False, status.value, False)
    if run["task"] != WORKFLOW_TASK:
        record_steps(conn, run["id"], event.steps, now)
    values: dict[str, Any] = {"output": event.output}
    error = event.error
    if event.type == "completed":
        to, code, message = RunStatus.COMPLETED, None, None
    else:
        code = error.code if error else "unknown_error"
        message = error.message if error else "the worker reported a failure without details"
        to = RunStatus.TIMED_OUT if code == TIMED_OUT_CODE else RunStatus.FAILED
        values.update(error_code=code, error_message=message)
    retrying = (
        to == RunStatus.FAILED
        and error is not None
        and error.retryable
        and run["attempt"] < run["max_attempts"]
    )
    values["started_at"] = KeepFirst(now)
    if retrying:
        delay = backoff(run["retry"], run["attempt"])
        values.update(attempt=run["attempt"] + 1, run_at=now + dt.timedelta(seconds=delay))
        transition(conn, run, RunStatus.RETRYING, now, values)
    else:
        values["finished_at"] = now
        transition(conn, run, to, now, values)
    attempt_status = RunStatus.FAILED if retrying else to
    attempt_values = {
        "status": attempt_status.value,
        "finished_at": now,
        "error_code": code,
        "error_message": message,
    }
    updated = conn.execute(
        FINISH_ATTEMPT, {"w_run_id": run["id"], "w_number": event.attempt, **attempt_values}
    )
    if updated.rowcount == 0:  # the ``started`` report has not arrived (yet)
        conn.execute(
            INSERT_ATTEMPT,
            {
                "run_id": run["id"],
                "number": event.attempt,
                "worker_id": event.worker_id,
                "started_at": now,
                **attempt_values,
            },
        )
    if retrying:
        return EventAnswer(True, RunStatus.RETRYING.value, False, Effects(changed=[run["id"]]))
    event_type = FINAL_EVENTS[to]
    effects = Effects(
        outgoing=create_run_deliveries(conn, run, lambda: view_of(conn, run), event_type, now),
        finished=[run["id"]],
    )
    if run["parent_id"] is not None:
        effects.add(
            child_finished(
                conn, run, to, now, output=event.output, error_code=code, error_message=message
            )
        )
    else:
        effects.changed.append(run["id"])
    return EventAnswer(True, to.value, False, effects)


def _apply_heartbeat(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> EventAnswer:
    """A running attempt is alive (also before its ``started`` report, held up
    by an outage, has arrived); ``proceed`` is false once the run moved on."""
    status = RunStatus(run["status"])
    alive = is_current(run, event) and status in ACTIVE
    if alive:
        conn.execute(
            runs.update()
            .where(
                runs.c.id == run["id"],
                runs.c.status == status.value,
                runs.c.attempt == event.attempt,
                runs.c.step == event.step,
            )
            .values(heartbeat_at=now)
        )
    return EventAnswer(False, status.value, alive)
