"""Durable tasks: a run whose own code waits (``ctx.trigger_and_wait``,
``ctx.sleep``, ``ctx.wait_for_token``) without holding a worker slot.

The worker runs the task until it reaches a wait it has no result for, then
reports ``waiting`` with the steps it did and what it waits on; the execution
ends there. The gateway keeps the steps as the run's nodes (``node_id`` is the
step's key, ``position`` its place in order), starts the children, sets the
sleeps and tokens waiting on waitpoints, and marks the run ``WAITING``. When
nothing it waits on is left (``gateway.runs.workflow``: each child's or
waitpoint's end looks), its next step is queued, and the job carries the kept
steps, so the task runs again from the top and every step already done
returns its kept result (docs/architecture.md, "Durable steps").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from db.models import RunStatus
from db.types import to_utc
from gateway.errors import InvalidEvent
from gateway.queues.admission import admit
from gateway.queues.slots import QueueRule
from gateway.runs.create import new_run
from gateway.runs.effects import Effects, job_of
from gateway.runs.requests import TriggerOptions
from gateway.runs.runs_table import insert_run, is_current, run_nodes, select_run, transition
from gateway.runs.workflow import (
    next_step,
    pending_nodes,
    set_waiting,
    upsert_node,
    waitpoints,
)
from jobs.protocol import StepRecord, WaitNode, WorkerEvent

__all__ = [
    "CHILD_OPTIONS_REFUSED",
    "WAITPOINT_CANCELED",
    "WAITPOINT_NOT_FOUND",
    "WAITPOINT_TAKEN",
    "WAITPOINT_TIMED_OUT",
    "apply_suspend",
    "record_steps",
]

#: A token step's error codes: its waitpoint timed out, was canceled, is not
#: the project's, or another run waits on it.
WAITPOINT_TIMED_OUT = "waitpoint_timed_out"
WAITPOINT_CANCELED = "waitpoint_canceled"
WAITPOINT_NOT_FOUND = "waitpoint_not_found"
WAITPOINT_TAKEN = "waitpoint_taken"
#: Trigger options a durable task's child may not have: its step's key is its
#: idempotency, its parent hears of its end, and it starts when it is asked for.
CHILD_OPTIONS_REFUSED = ("idempotency_key", "idempotency_key_ttl", "callback_url", "debounce")


def _time(value: str | None, default: dt.datetime | None) -> dt.datetime | None:
    if not value:
        return default
    try:
        return to_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return default


def record_steps(
    conn: sa.Connection, run_id: str, records: Sequence[StepRecord], now: dt.datetime
) -> None:
    """Keep the steps an execution reports: a new one is inserted; one kept
    already changes only while it is not ``completed`` (a step that failed
    and ran again, a batch whose children all ended): a completed step's
    result is never replaced."""
    if not records:
        return
    kept: dict[str, str] = dict(
        conn.execute(
            sa.select(run_nodes.c.node_id, run_nodes.c.status).where(
                run_nodes.c.parent_id == run_id,
                run_nodes.c.node_id.in_([r.key for r in records]),
            )
        ).all()
    )
    for record in records:
        values: dict[str, Any] = {
            "kind": record.kind,
            "position": record.position,
            "status": record.status,
            "output": record.output,
            "error_code": record.error.code if record.error else None,
            "error_message": record.error.message if record.error else None,
            "finished_at": _time(record.finished_at, None),
            "updated_at": now,
        }
        if record.key not in kept:
            conn.execute(
                run_nodes.insert(),
                {
                    "parent_id": run_id,
                    "node_id": record.key,
                    "started_at": _time(record.started_at, now),
                    **values,
                },
            )
        elif kept[record.key] != "completed":
            if record.output is None:
                del values["output"]  # a batch's end says nothing of its children's
            conn.execute(
                run_nodes.update()
                .where(run_nodes.c.parent_id == run_id, run_nodes.c.node_id == record.key)
                .values(values)
            )


def _wait_on_token(
    conn: sa.Connection, run: dict[str, Any], wait: WaitNode, now: dt.datetime
) -> None:
    """Make a ``token`` step wait on its waitpoint, or end it at once if the
    waitpoint ended already (completed before the task came to wait on it,
    timed out, canceled), is not the project's, or another run waits on it."""
    found = (
        conn.execute(
            sa.select(waitpoints)
            .where(
                waitpoints.c.id == (wait.waitpoint_id or ""),
                waitpoints.c.project_id == run["project_id"],
            )
            .with_for_update()
        )
        .mappings()
        .first()
    )

    def end(code: str, message: str) -> None:
        upsert_node(
            conn,
            run["id"],
            wait.node_id,
            now,
            status="failed",
            error_code=code,
            error_message=message,
            finished_at=now,
        )

    if found is None:
        end(WAITPOINT_NOT_FOUND, f"no waitpoint with id {wait.waitpoint_id!r}")
        return
    if found["node_id"] is not None and (found["run_id"], found["node_id"]) != (
        run["id"],
        wait.node_id,
    ):
        end(WAITPOINT_TAKEN, f"run {found['run_id']} waits on waitpoint {found['id']} already")
        return
    if found["status"] == "WAITING":
        conn.execute(
            waitpoints.update()
            .where(waitpoints.c.id == found["id"], waitpoints.c.status == "WAITING")
            .values(run_id=run["id"], node_id=wait.node_id)
        )
        upsert_node(conn, run["id"], wait.node_id, now, status="waiting", waitpoint_id=found["id"])
    elif found["status"] == "COMPLETED":
        upsert_node(
            conn,
            run["id"],
            wait.node_id,
            now,
            status="completed",
            waitpoint_id=found["id"],
            output=found["output"],
            finished_at=now,
        )
    elif found["status"] == "TIMED_OUT":
        end(WAITPOINT_TIMED_OUT, "the waitpoint timed out")
    else:
        end(WAITPOINT_CANCELED, f"the waitpoint is {found['status']}")


def _start_child(
    conn: sa.Connection,
    run: dict[str, Any],
    node_id: str,
    task: str,
    payload: Any,
    options: dict[str, Any],
    now: dt.datetime,
    rules: dict[tuple[str, str], QueueRule],
    done: Effects,
) -> None:
    """A child run of a durable task, with the trigger options it gave (checked
    already, ``gateway.api.internal``), in its queue and under its limits."""
    row = new_run(
        run["project_id"],
        task,
        payload,
        TriggerOptions.model_validate(options),
        now=now,
        callback_url=None,
        links=[run.get("traceparent")],
    ).row
    row.update(parent_id=run["id"], node_id=node_id)
    starts = row["status"] == RunStatus.QUEUED.value and admit(conn, row, rules)
    insert_run(conn, row)
    upsert_node(conn, run["id"], node_id, now, status="running", run_id=row["id"])
    if starts:
        done.jobs.append(job_of(row))


def apply_suspend(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> tuple[bool, RunStatus, Effects]:
    """A durable task's execution reached a wait: keep its steps, start its
    children, set its sleeps and tokens waiting, and wait (``WAITING``), or
    run again at once if everything it waits on has ended already (a token
    completed before the task came to it). Whether it applied, the run's
    status, and the effects.

    :raises InvalidEvent: the report names nothing to wait on, and nothing is
        left to wait on (the task would run again for ever)
    """
    status = RunStatus(run["status"])
    if not (is_current(run, event) and status == RunStatus.EXECUTING):
        return False, status, Effects()
    record_steps(conn, run["id"], event.steps, now)
    done = Effects(changed=[run["id"]])
    rules: dict[tuple[str, str], QueueRule] = {}
    for spec in event.spawn:
        _start_child(
            conn, run, spec.node_id, spec.task, spec.payload, spec.options or {}, now, rules, done
        )
    for wait in event.waits:
        if wait.kind == "token":
            _wait_on_token(conn, run, wait, now)
        elif wait.kind == "delay":
            set_waiting(conn, run, wait, now)
        else:
            raise InvalidEvent(f"a durable task waits on a sleep or a token, not a {wait.kind!r}")
    fresh = select_run(conn, run["id"])
    assert fresh is not None
    if pending_nodes(conn, run["id"]):
        transition(conn, fresh, RunStatus.WAITING, now)
        return True, RunStatus.WAITING, done
    if not (event.spawn or event.waits):
        raise InvalidEvent(f"run {run['id']} reported waiting, but waits on nothing")
    done.jobs.append(next_step(conn, fresh, now))
    return True, RunStatus.QUEUED, done
