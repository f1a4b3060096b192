"""Workflows: a run that waits (WAITING) while its nodes run as child runs.

A workflow runs in steps; each step is a short job. A ``waiting`` report
starts the children the step named, and each child's end queues the next step
(or, if a step is in flight, asks for one more after it), so a waiting
workflow holds no worker slot (docs/architecture.md, invariant 5).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from db.ids import new_id
from db.models import RunStatus, Waitpoint
from db.types import to_utc
from gateway.errors import InvalidEvent
from gateway.queues.admission import admit
from gateway.queues.slots import QueueRule, default_queue
from gateway.runs.effects import Effects, Job
from gateway.runs.read import node_states, run_job
from gateway.runs.runs_table import (
    ACTIVE,
    insert_run,
    is_current,
    run_nodes,
    runs,
    select_run,
    transition,
)
from jobs import tracing
from jobs.protocol import WORKFLOW_TASK, WaitNode, WorkerEvent

waitpoints = Waitpoint.__table__  # type: ignore[attr-defined]

__all__ = [
    "apply_waiting",
    "child_finished",
    "downstream_of",
    "next_step",
    "node_finished",
    "node_states",
    "pending_nodes",
    "seed_nodes",
    "set_waiting",
    "upsert_node",
]

#: A node (or a durable step) that something outside the run will end.
PENDING = ("running", "waiting")


def upsert_node(
    conn: sa.Connection, parent_id: str, node_id: str, now: dt.datetime, **values: Any
) -> None:
    updated = conn.execute(
        run_nodes.update()
        .where(run_nodes.c.parent_id == parent_id, run_nodes.c.node_id == node_id)
        .values(updated_at=now, **values)
    )
    if updated.rowcount == 0:
        conn.execute(
            run_nodes.insert(),
            {"parent_id": parent_id, "node_id": node_id, "updated_at": now, **values},
        )


def next_step(conn: sa.Connection, parent: dict[str, Any], now: dt.datetime) -> Job:
    """Move the workflow (or durable task) to QUEUED for its next step; the
    job that runs it."""
    step = parent["step"] + 1
    transition(conn, parent, RunStatus.QUEUED, now, {"step": step, "step_pending": False})
    return run_job(conn, {**parent, "step": step})


def pending_nodes(conn: sa.Connection, parent_id: str) -> int:
    """How many of the run's nodes (or steps) wait on a child or a waitpoint
    (a batch's own step waits on its children's, which count)."""
    return int(
        conn.scalar(
            sa.select(sa.func.count()).where(
                run_nodes.c.parent_id == parent_id,
                run_nodes.c.status.in_(PENDING),
                sa.or_(run_nodes.c.run_id.is_not(None), run_nodes.c.waitpoint_id.is_not(None)),
            )
        )
        or 0
    )


def _move_on(conn: sa.Connection, parent: dict[str, Any], now: dt.datetime, done: Effects) -> None:
    """A node of ``parent`` ended: a waiting workflow's next step is queued
    (it starts what the node unblocked); a durable task runs again once
    nothing it waits on is left (docs/architecture.md, "Durable steps"). If
    a step is in flight, one more is asked for after it."""
    status = RunStatus(parent["status"])
    if parent["task"] != WORKFLOW_TASK and pending_nodes(conn, parent["id"]):
        return
    if status == RunStatus.WAITING:
        done.jobs.append(next_step(conn, parent, now))
    elif status in ACTIVE:
        conn.execute(runs.update().where(runs.c.id == parent["id"]).values(step_pending=True))


def child_finished(
    conn: sa.Connection,
    child: dict[str, Any],
    to: RunStatus,
    now: dt.datetime,
    *,
    output: Any = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> Effects:
    """Record a child's end on its workflow's node and, if the workflow waits,
    queue its next step; if a step is in flight, ask for one more after it."""
    parent = select_run(conn, child["parent_id"], lock=True)
    if parent is None:
        return Effects(changed=[child["id"]])
    completed = to == RunStatus.COMPLETED
    upsert_node(
        conn,
        parent["id"],
        child["node_id"],
        now,
        status="completed" if completed else "failed",
        run_id=child["id"],
        output=output if completed else None,
        error_code=None if completed else error_code,
        error_message=None if completed else error_message,
        finished_at=now,
    )
    done = Effects(changed=[child["id"], parent["id"]])
    _move_on(conn, parent, now, done)
    return done


def node_finished(
    conn: sa.Connection,
    parent_id: str,
    node_id: str,
    now: dt.datetime,
    *,
    completed: bool,
    output: Any = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> Effects:
    """A ``wait`` or ``delay`` node's waitpoint (a ``sleep`` or ``token``
    step's) ended: record it on the node and move the run on, as a child's
    end does."""
    parent = select_run(conn, parent_id, lock=True)
    if parent is None or RunStatus(parent["status"]).is_final:
        return Effects()
    upsert_node(
        conn,
        parent_id,
        node_id,
        now,
        status="completed" if completed else "failed",
        output=output if completed else None,
        error_code=None if completed else error_code,
        error_message=None if completed else error_message,
        finished_at=now,
    )
    done = Effects(changed=[parent_id])
    _move_on(conn, parent, now, done)
    return done


def set_waiting(conn: sa.Connection, run: dict[str, Any], spec: WaitNode, now: dt.datetime) -> None:
    """Set a ``wait`` or ``delay`` node (a durable ``sleep``) waiting on a
    waitpoint of its own."""
    if spec.kind == "wait":
        kind = "manual"
        at = now + dt.timedelta(seconds=spec.timeout) if spec.timeout else None
    else:
        kind = "delay"
        at = now + dt.timedelta(seconds=spec.seconds or 0)
        if spec.seconds is None and spec.until:
            try:
                at = to_utc(dt.datetime.fromisoformat(spec.until.replace("Z", "+00:00")))
            except ValueError:
                at = now
    waitpoint_id = new_id("wp")
    conn.execute(
        waitpoints.insert(),
        {
            "id": waitpoint_id,
            "project_id": run["project_id"],
            "status": "WAITING",
            "kind": kind,
            # A delay passes on what its input gave it.
            "output": {"value": spec.value} if kind == "delay" else None,
            "idempotency_key": None,
            "tags": [],
            "timeout_at": at,
            "run_id": run["id"],
            "node_id": spec.node_id,
            "created_at": now,
            "completed_at": None,
        },
    )
    upsert_node(conn, run["id"], spec.node_id, now, status="waiting", waitpoint_id=waitpoint_id)


def apply_waiting(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> tuple[bool, RunStatus, Effects]:
    """A workflow step is done: start its children, then wait for them (or, if
    a child ended meanwhile, go straight on to the next step). Whether it
    applied, the run's status, and the effects. (A durable task's ``waiting``
    report is ``gateway.runs.durable.apply_suspend``'s.)"""
    if any(wait.kind == "token" for wait in event.waits):
        raise InvalidEvent("a workflow's nodes wait on waitpoints of their own, not on tokens")
    status = RunStatus(run["status"])
    if not (is_current(run, event) and status == RunStatus.EXECUTING):
        return False, status, Effects()
    existing = node_states(conn, run["id"])
    for node_id, state in event.nodes.items():
        if node_id in existing or state.get("status") in ("running", "waiting"):
            # What the gateway recorded wins; running nodes get a child below,
            # waiting ones a waitpoint.
            continue
        upsert_node(
            conn,
            run["id"],
            node_id,
            now,
            status=state.get("status", "skipped"),
            output=state.get("output"),
        )
    done = Effects(changed=[run["id"]])
    rules: dict[tuple[str, str], QueueRule] = {}
    for spec in event.spawn:
        if spec.node_id in existing:
            continue
        child_id = new_id("run")
        queue, _ = default_queue(spec.task)
        child: dict[str, Any] = {
            "id": child_id,
            "project_id": run["project_id"],
            "task": spec.task,
            "status": RunStatus.QUEUED.value,
            "attempt": 1,
            "step": 0,
            "step_pending": False,
            "payload": spec.payload,
            "output": None,
            "error_code": None,
            "error_message": None,
            "tags": [],
            "metadata": {},
            "created_at": now,
            "updated_at": now,
            "started_at": None,
            "finished_at": None,
            "callback_url": None,
            "parent_id": run["id"],
            "node_id": spec.node_id,
            "queue": queue,
            "traceparent": tracing.mint(f"new run {spec.task}", links=[run.get("traceparent")]),
        }
        starts = admit(conn, child, rules)
        insert_run(conn, child)
        upsert_node(conn, run["id"], spec.node_id, now, status="running", run_id=child_id)
        if starts:
            done.jobs.append(run_job(conn, child))
    for wait in event.waits:
        if wait.node_id not in existing:
            set_waiting(conn, run, wait, now)
    fresh = select_run(conn, run["id"])
    assert fresh is not None
    if fresh["step_pending"]:
        done.jobs.append(next_step(conn, fresh, now))
        return True, RunStatus.QUEUED, done
    transition(conn, fresh, RunStatus.WAITING, now)
    return True, RunStatus.WAITING, done


def downstream_of(payload: Any, node_id: str) -> set[str]:
    """``node_id`` and every node its edges reach, in a workflow's payload."""
    edges = payload.get("edges", []) if isinstance(payload, dict) else []
    targets: dict[str, list[str]] = {}
    for edge in edges:
        if isinstance(edge, dict):
            targets.setdefault(str(edge.get("source")), []).append(str(edge.get("target")))
    reached, todo = {node_id}, [node_id]
    while todo:
        for nxt in targets.get(todo.pop(), []):
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    return reached


def seed_nodes(
    conn: sa.Connection, parent_id: str, reused: dict[str, Any], now: dt.datetime
) -> None:
    """Give a new workflow run the completed nodes it reuses (state and the
    child run that made each), so it starts no child run for them."""
    for node_id, state in reused.items():
        upsert_node(
            conn,
            parent_id,
            node_id,
            now,
            status="completed",
            run_id=state["run_id"],
            output=state["output"],
        )
