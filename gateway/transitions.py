"""Units of work on runs: each runs inside one database transaction.

Every change of a run's status goes through :func:`transition`, a
compare-and-set that names the status, attempt and step it expects (DESIGN.md,
invariant 3), so a duplicate, late or replayed report changes nothing. Jobs
and deliveries a transition causes are returned, to be queued once the
transaction has committed (invariants 1 and 4).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db.ids import new_id
from db.models import Batch, IdempotencyKey, Run, RunAttempt, RunNode, RunStatus, RunTransition
from db.types import isoformat, utcnow
from gateway.errors import InvalidEvent
from gateway.metrics import observe_transition
from gateway.webhooks import FINAL_EVENTS, Outgoing, create_run_deliveries
from jobs.protocol import TIMED_OUT_CODE, WORKFLOW_TASK, WorkerError, WorkerEvent, run_job_id

__all__ = [
    "Canceled",
    "Due",
    "EventOutcome",
    "Job",
    "KeepFirst",
    "LostRace",
    "NewRun",
    "apply_event",
    "backoff",
    "cancel_run",
    "create_runs",
    "insert_run",
    "job_of",
    "load_run",
    "node_states",
    "queued_before",
    "recover_lost",
    "release_due",
    "reschedule",
    "run_view",
]

runs = Run.__table__  # type: ignore[attr-defined]
run_attempts = RunAttempt.__table__  # type: ignore[attr-defined]
run_transitions = RunTransition.__table__  # type: ignore[attr-defined]
run_nodes = RunNode.__table__  # type: ignore[attr-defined]
idempotency_keys = IdempotencyKey.__table__  # type: ignore[attr-defined]
batches = Batch.__table__  # type: ignore[attr-defined]

ACTIVE = (RunStatus.QUEUED, RunStatus.EXECUTING)


# -- statements built once ----------------------------------------------------------
#
# The hot units (a trigger, a worker event, a read of a run) run the same few
# statements thousands of times a second. Building a statement and its cache
# key costs more CPU than SQLite takes to run it, so these are built once, with
# bound parameters, and only their values change.

_P = sa.bindparam


@dataclasses.dataclass(frozen=True)
class KeepFirst:
    """A column value for :func:`transition` that is set only while the column is NULL."""

    value: Any


_RUN_FIELDS = (
    "id",
    "project_id",
    "task",
    "status",
    "attempt",
    "step",
    "step_pending",
    "callback_url",
    "parent_id",
    "node_id",
    "payload",
    "created_at",
    "started_at",
    "max_attempts",
    "retry",
    "max_duration",
    "expire_at",
)
_SELECT_RUN = sa.select(*(runs.c[f] for f in _RUN_FIELDS)).where(runs.c.id == _P("run_id"))
_SELECT_RUN_LOCKED = _SELECT_RUN.with_for_update()
_LOAD_RUN = sa.select(runs).where(runs.c.id == _P("run_id"))
_LOAD_OWN_RUN = _LOAD_RUN.where(runs.c.project_id == _P("project_id"))
_LOAD_ATTEMPTS = (
    sa.select(run_attempts)
    .where(run_attempts.c.run_id == _P("run_id"))
    .order_by(run_attempts.c.number)
)
_INSERT_RUN = runs.insert()
_INSERT_TRANSITION = run_transitions.insert()
_INSERT_ATTEMPT = run_attempts.insert()
_FINISH_ATTEMPT = (
    run_attempts.update()
    .where(run_attempts.c.run_id == _P("w_run_id"), run_attempts.c.number == _P("w_number"))
    .values(
        status=_P("status"),
        finished_at=_P("finished_at"),
        error_code=_P("error_code"),
        error_message=_P("error_message"),
    )
)


@functools.lru_cache(maxsize=256)
def _cas_update(names: tuple[str, ...], first: frozenset[str]) -> sa.Update:
    """The compare-and-set UPDATE that sets ``names`` (those in ``first`` only
    while NULL), one per shape of change."""
    values: dict[str, Any] = {}
    for name in names:
        bound = _P(f"v_{name}", type_=runs.c[name].type)
        values[name] = sa.func.coalesce(runs.c[name], bound) if name in first else bound
    update: sa.Update = runs.update().where(
        runs.c.id == _P("w_id"),
        runs.c.status == _P("w_status"),
        runs.c.attempt == _P("w_attempt"),
        runs.c.step == _P("w_step"),
    )
    return update.values(values)


class LostRace(Exception):
    """Another gateway process applied a transition first; the caller retries."""


@dataclasses.dataclass(frozen=True)
class Job:
    """A ``run_task`` job to queue once the transaction has committed."""

    run_id: str
    task: str
    payload: Any
    attempt: int = 1
    step: int = 0
    state: dict[str, Any] | None = None
    #: What the worker enforces itself (``max_duration``).
    options: dict[str, Any] | None = None


def job_of(run: Mapping[str, Any], *, state: dict[str, Any] | None = None) -> Job:
    """The job that runs ``run``'s current attempt (and step)."""
    options = {"max_duration": run["max_duration"]} if run.get("max_duration") else None
    return Job(
        run["id"], run["task"], run["payload"], run["attempt"], run.get("step", 0), state, options
    )


@dataclasses.dataclass(frozen=True)
class EventOutcome:
    """The gateway's answer to a worker event, and what it set in motion.

    ``applied`` says whether it changed the run; ``proceed`` tells a worker
    that reported ``started`` whether to execute the task at all.
    """

    applied: bool
    status: str
    proceed: bool
    outgoing: tuple[Outgoing, ...] = ()
    jobs: tuple[Job, ...] = ()
    #: Runs whose waiters should wake (the run itself, and a parent it moved).
    changed: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "status": self.status, "proceed": self.proceed}


# -- views ------------------------------------------------------------------------


def _error(code: str | None, message: str | None) -> dict[str, Any] | None:
    if code is None:
        return None
    return {"code": code, "message": message or ""}


def run_view(
    row: Mapping[str, Any],
    attempts: Iterable[Mapping[str, Any]],
    nodes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run as the API shows it."""
    status = RunStatus(row["status"])
    started, finished = row["started_at"], row["finished_at"]
    duration_ms = None
    if started is not None and finished is not None:
        duration_ms = max(0, round((finished - started).total_seconds() * 1000))
    view = {
        "id": row["id"],
        "task": row["task"],
        "status": status.value,
        "is_final": status.is_final,
        "payload": row["payload"],
        "output": row["output"],
        "error": _error(row["error_code"], row["error_message"]),
        "attempt": row["attempt"],
        "attempts": [
            {
                "number": a["number"],
                "status": a["status"],
                "worker_id": a["worker_id"],
                "started_at": isoformat(a["started_at"]),
                "finished_at": isoformat(a["finished_at"]),
                "error": _error(a["error_code"], a["error_message"]),
            }
            for a in attempts
        ],
        "tags": list(row["tags"] or []),
        "metadata": dict(row["metadata"] or {}),
        "parent_id": row.get("parent_id"),
        "node_id": row.get("node_id"),
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
        "started_at": isoformat(started),
        "finished_at": isoformat(finished),
        "duration_ms": duration_ms,
    }
    if nodes is not None:
        view["nodes"] = nodes
    return view


def _node_views(conn: sa.Connection, row: Mapping[str, Any]) -> dict[str, Any]:
    """Every node of a workflow: its status (its child run's while it runs), child
    run ID, output and error, so an editor can colour each node."""
    child = runs.alias("child")
    found = {
        r["node_id"]: r
        for r in conn.execute(
            sa.select(run_nodes, child.c.status.label("child_status"))
            .select_from(run_nodes.outerjoin(child, child.c.id == run_nodes.c.run_id))
            .where(run_nodes.c.parent_id == row["id"])
        ).mappings()
    }
    graph = row["payload"].get("nodes", []) if isinstance(row["payload"], dict) else []
    views: dict[str, Any] = {}
    for node in graph:
        node_id = node.get("id") if isinstance(node, dict) else None
        if not isinstance(node_id, str):
            continue
        r = found.get(node_id)
        if r is None:
            status = "SKIPPED" if RunStatus(row["status"]).is_final else "PENDING"
            views[node_id] = {
                "type": node.get("type"),
                "status": status,
                "run_id": None,
                "output": None,
                "error": None,
            }
            continue
        status = (
            r["child_status"]
            if r["status"] == "running" and r["child_status"]
            else (r["status"].upper())
        )
        views[node_id] = {
            "type": node.get("type"),
            "status": status,
            "run_id": r["run_id"],
            "output": r["output"],
            "error": _error(r["error_code"], r["error_message"]),
        }
    return views


def load_run(conn: sa.Connection, project_id: str | None, run_id: str) -> dict[str, Any] | None:
    """The run's view, or ``None``; ``project_id=None`` skips the owner check."""
    if project_id is None:
        found = conn.execute(_LOAD_RUN, {"run_id": run_id})
    else:
        found = conn.execute(_LOAD_OWN_RUN, {"run_id": run_id, "project_id": project_id})
    row = found.mappings().first()
    if row is None:
        return None
    attempts = conn.execute(_LOAD_ATTEMPTS, {"run_id": run_id}).mappings()
    nodes = _node_views(conn, dict(row)) if row["task"] == WORKFLOW_TASK else None
    return run_view(dict(row), [dict(a) for a in attempts], nodes)


# -- writing ----------------------------------------------------------------------


def insert_run(conn: sa.Connection, row: Mapping[str, Any]) -> None:
    conn.execute(_INSERT_RUN, dict(row))
    observe_transition(dict(row), RunStatus(row["status"]), row["created_at"])
    conn.execute(
        _INSERT_TRANSITION,
        {
            "run_id": row["id"],
            "from_status": None,
            "to_status": row["status"],
            "attempt": row["attempt"],
            "at": row["created_at"],
        },
    )


def transition(
    conn: sa.Connection,
    run: Mapping[str, Any],
    to: RunStatus,
    now: dt.datetime,
    values: Mapping[str, Any] | None = None,
) -> None:
    """Compare-and-set the run from the status, attempt and step in ``run`` to
    ``to``, and log the change; :class:`LostRace` if another process moved it."""
    changes = {"status": to.value, "updated_at": now, **(values or {})}
    first = frozenset(k for k, v in changes.items() if isinstance(v, KeepFirst))
    params = {f"v_{k}": v.value if isinstance(v, KeepFirst) else v for k, v in changes.items()}
    params.update(
        w_id=run["id"], w_status=run["status"], w_attempt=run["attempt"], w_step=run["step"]
    )
    result = conn.execute(_cas_update(tuple(changes), first), params)
    if result.rowcount != 1:
        raise LostRace(run["id"])
    observe_transition(run, to, now)
    conn.execute(
        _INSERT_TRANSITION,
        {
            "run_id": run["id"],
            "from_status": run["status"],
            "to_status": to.value,
            "attempt": run["attempt"],
            "at": now,
        },
    )


def _view(conn: sa.Connection, run: Mapping[str, Any]) -> dict[str, Any]:
    view = load_run(conn, None, run["id"])
    assert view is not None
    return view


def _select_run(conn: sa.Connection, run_id: str, *, lock: bool = False) -> dict[str, Any] | None:
    query = _SELECT_RUN_LOCKED if lock else _SELECT_RUN
    row = conn.execute(query, {"run_id": run_id}).mappings().first()
    return dict(row) if row is not None else None


def _is_current(run: Mapping[str, Any], event: WorkerEvent) -> bool:
    return bool(run["attempt"] == event.attempt and run["step"] == event.step)


def _apply_started(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> EventOutcome:
    status = RunStatus(run["status"])
    current = _is_current(run, event)
    if current and status == RunStatus.QUEUED and _expired(run, now):
        # Its TTL ran out while it waited in the queue: it never executes.
        return EventOutcome(
            applied=True,
            status=RunStatus.EXPIRED.value,
            proceed=False,
            outgoing=tuple(_expire(conn, run, now)),
            changed=(run["id"],),
        )
    if not (current and status == RunStatus.QUEUED):
        # A re-delivered job of the attempt that is running may go on (execution
        # is at-least-once); anything else must not run.
        proceed = current and status == RunStatus.EXECUTING
        return EventOutcome(applied=False, status=status.value, proceed=proceed)
    transition(
        conn,
        run,
        RunStatus.EXECUTING,
        now,
        {"started_at": KeepFirst(now), "heartbeat_at": now},
    )
    outgoing: list[Outgoing] = []
    if run["step"] == 0:  # a workflow's later steps are not new attempts
        conn.execute(
            _INSERT_ATTEMPT,
            {
                "run_id": run["id"],
                "number": event.attempt,
                "status": RunStatus.EXECUTING.value,
                "worker_id": event.worker_id,
                "started_at": now,
            },
        )
        outgoing = create_run_deliveries(conn, run, lambda: _view(conn, run), "run.started", now)
    return EventOutcome(
        applied=True,
        status=RunStatus.EXECUTING.value,
        proceed=True,
        outgoing=tuple(outgoing),
        changed=(run["id"],),
    )


def _apply_final(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> EventOutcome:
    status = RunStatus(run["status"])
    if not (_is_current(run, event) and status in ACTIVE):
        return EventOutcome(applied=False, status=status.value, proceed=False)
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
        _FINISH_ATTEMPT, {"w_run_id": run["id"], "w_number": event.attempt, **attempt_values}
    )
    if updated.rowcount == 0:  # the ``started`` report has not arrived (yet)
        conn.execute(
            _INSERT_ATTEMPT,
            {
                "run_id": run["id"],
                "number": event.attempt,
                "worker_id": event.worker_id,
                "started_at": now,
                **attempt_values,
            },
        )
    if retrying:
        return EventOutcome(
            applied=True, status=RunStatus.RETRYING.value, proceed=False, changed=(run["id"],)
        )
    outgoing = create_run_deliveries(conn, run, lambda: _view(conn, run), FINAL_EVENTS[to], now)
    jobs: tuple[Job, ...] = ()
    changed: tuple[str, ...] = (run["id"],)
    if run["parent_id"] is not None:
        jobs, changed = _child_finished(
            conn, run, to, now, output=event.output, error_code=code, error_message=message
        )
    return EventOutcome(
        applied=True,
        status=to.value,
        proceed=False,
        outgoing=tuple(outgoing),
        jobs=jobs,
        changed=changed,
    )


# -- workflows ----------------------------------------------------------------------


def node_states(conn: sa.Connection, parent_id: str) -> dict[str, Any]:
    """The workflow's node states, as a step job takes them."""
    states: dict[str, Any] = {}
    for r in conn.execute(
        sa.select(run_nodes).where(run_nodes.c.parent_id == parent_id)
    ).mappings():
        state: dict[str, Any] = {"status": r["status"], "run_id": r["run_id"]}
        if r["output"] is not None:
            state["output"] = r["output"]
        if r["error_code"] is not None:
            state["error"] = {"code": r["error_code"], "message": r["error_message"]}
        states[r["node_id"]] = state
    return states


def _upsert_node(
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


def _next_step(conn: sa.Connection, parent: dict[str, Any], now: dt.datetime) -> Job:
    """Move the workflow to QUEUED for its next step; the job that runs it."""
    step = parent["step"] + 1
    transition(conn, parent, RunStatus.QUEUED, now, {"step": step, "step_pending": False})
    return Job(
        parent["id"],
        parent["task"],
        parent["payload"],
        parent["attempt"],
        step,
        node_states(conn, parent["id"]),
    )


def _child_finished(
    conn: sa.Connection,
    child: dict[str, Any],
    to: RunStatus,
    now: dt.datetime,
    *,
    output: Any = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> tuple[tuple[Job, ...], tuple[str, ...]]:
    """Record a child's end on its workflow's node and, if the workflow waits,
    queue its next step; if a step is in flight, ask for one more after it."""
    parent = _select_run(conn, child["parent_id"], lock=True)
    if parent is None:
        return (), (child["id"],)
    completed = to == RunStatus.COMPLETED
    _upsert_node(
        conn,
        parent["id"],
        child["node_id"],
        now,
        status="completed" if completed else "failed",
        run_id=child["id"],
        output=output if completed else None,
        error_code=None if completed else error_code,
        error_message=None if completed else error_message,
    )
    status = RunStatus(parent["status"])
    if status == RunStatus.WAITING:
        return (_next_step(conn, parent, now),), (child["id"], parent["id"])
    if status in ACTIVE:
        conn.execute(runs.update().where(runs.c.id == parent["id"]).values(step_pending=True))
    return (), (child["id"], parent["id"])


def _apply_waiting(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> EventOutcome:
    """A workflow step is done: start its children, then wait for them (or, if a
    child ended meanwhile, go straight on to the next step)."""
    if run["task"] != WORKFLOW_TASK:
        raise InvalidEvent(f"run {run['id']} is not a workflow; only a workflow step waits")
    status = RunStatus(run["status"])
    if not (_is_current(run, event) and status == RunStatus.EXECUTING):
        return EventOutcome(applied=False, status=status.value, proceed=False)
    existing = node_states(conn, run["id"])
    for node_id, state in event.nodes.items():
        if node_id in existing or state.get("status") == "running":
            continue  # what the gateway recorded wins; running nodes get a child below
        _upsert_node(
            conn,
            run["id"],
            node_id,
            now,
            status=state.get("status", "skipped"),
            output=state.get("output"),
        )
    jobs: list[Job] = []
    for spec in event.spawn:
        if spec.node_id in existing:
            continue
        child_id = new_id("run")
        insert_run(
            conn,
            {
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
            },
        )
        _upsert_node(conn, run["id"], spec.node_id, now, status="running", run_id=child_id)
        jobs.append(Job(child_id, spec.task, spec.payload))
    fresh = _select_run(conn, run["id"])
    assert fresh is not None
    if fresh["step_pending"]:
        jobs.append(_next_step(conn, fresh, now))
        new_status = RunStatus.QUEUED
    else:
        transition(conn, fresh, RunStatus.WAITING, now)
        new_status = RunStatus.WAITING
    return EventOutcome(
        applied=True, status=new_status.value, proceed=False, jobs=tuple(jobs), changed=(run["id"],)
    )


def apply_event(conn: sa.Connection, event: WorkerEvent) -> EventOutcome | None:
    """Apply one worker event; ``None`` when the run does not exist."""
    run = _select_run(conn, event.run_id, lock=event.type == "waiting")
    if run is None:
        return None
    now = utcnow()
    if event.type == "started":
        return _apply_started(conn, event, run, now)
    if event.type == "waiting":
        return _apply_waiting(conn, event, run, now)
    if event.type == "heartbeat":
        return _apply_heartbeat(conn, event, run, now)
    return _apply_final(conn, event, run, now)


def _apply_heartbeat(
    conn: sa.Connection, event: WorkerEvent, run: dict[str, Any], now: dt.datetime
) -> EventOutcome:
    """A running attempt is alive (also before its ``started`` report, held up
    by an outage, has arrived); ``proceed`` is false once the run moved on."""
    status = RunStatus(run["status"])
    alive = _is_current(run, event) and status in ACTIVE
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
    return EventOutcome(applied=False, status=status.value, proceed=alive)


LOST_CODE = "worker_lost"


def recover_lost(
    conn: sa.Connection,
    now: dt.datetime,
    timeout: float,
    taken: Sequence[str] = (),
    limit: int = 100,
) -> Due:
    """End attempts whose worker went away as failed with ``worker_lost``:
    retried if attempts remain, like any retryable failure, else the run fails.

    Two kinds: EXECUTING runs with no heartbeat for ``timeout`` seconds, and
    the QUEUED runs in ``taken``: their job was taken by a worker (arq's
    in-progress key) or is over (arq's result key; arq stores one for a job
    whose data vanished), and still no start was reported.
    """
    done = Due()
    silent = now - dt.timedelta(seconds=timeout)
    executing = (
        conn.execute(
            sa.select(runs.c.id)
            .where(
                runs.c.status == RunStatus.EXECUTING.value,
                sa.func.coalesce(runs.c.heartbeat_at, runs.c.updated_at) < silent,
            )
            .limit(limit)
        )
        .scalars()
        .all()
    )
    for run_id in [*executing, *taken]:
        run = _select_run(conn, run_id, lock=True)
        if run is None or run["status"] not in ACTIVE:
            continue
        beat = conn.scalar(
            sa.select(sa.func.coalesce(runs.c.heartbeat_at, runs.c.updated_at)).where(
                runs.c.id == run_id
            )
        )
        if beat is not None and beat >= silent:
            continue
        event = WorkerEvent(
            type="failed",
            run_id=run_id,
            attempt=run["attempt"],
            step=run["step"],
            error=WorkerError(
                code=LOST_CODE,
                retryable=True,
                message=f"no word from the worker for {timeout:g} s",
            ),
        )
        outcome = _apply_final(conn, event, run, now)
        done.abort.append(run_job_id(run_id, run["attempt"], run["step"]))
        done.jobs.extend(outcome.jobs)
        done.outgoing.extend(outcome.outgoing)
        done.changed.extend(outcome.changed)
    return done


def queued_before(
    conn: sa.Connection, before: dt.datetime, limit: int = 100
) -> list[tuple[str, str]]:
    """QUEUED runs unchanged since ``before``, with their current job IDs."""
    rows = conn.execute(
        sa.select(runs.c.id, runs.c.attempt, runs.c.step)
        .where(runs.c.status == RunStatus.QUEUED.value, runs.c.updated_at < before)
        .order_by(runs.c.updated_at)
        .limit(limit)
    )
    return [(r.id, run_job_id(r.id, r.attempt, r.step)) for r in rows]


# -- cancel ---------------------------------------------------------------------------


@dataclasses.dataclass
class Canceled:
    """What canceling a run set in motion, to do once the transaction commits."""

    abort: list[str] = dataclasses.field(default_factory=list)
    outgoing: list[Outgoing] = dataclasses.field(default_factory=list)
    jobs: list[Job] = dataclasses.field(default_factory=list)
    changed: list[str] = dataclasses.field(default_factory=list)


def _cancel(
    conn: sa.Connection, run: dict[str, Any], now: dt.datetime, done: Canceled, *, from_parent: bool
) -> None:
    transition(conn, run, RunStatus.CANCELED, now, {"finished_at": now, "step_pending": False})
    conn.execute(
        run_attempts.update()
        .where(run_attempts.c.run_id == run["id"], run_attempts.c.finished_at.is_(None))
        .values(status=RunStatus.CANCELED.value, finished_at=now)
    )
    done.abort.append(run_job_id(run["id"], run["attempt"], run["step"]))
    done.changed.append(run["id"])
    done.outgoing.extend(
        create_run_deliveries(conn, run, lambda: _view(conn, run), "run.canceled", now)
    )
    children = (
        conn.execute(
            sa.select(runs.c.id).where(
                runs.c.parent_id == run["id"],
                runs.c.status.not_in([s.value for s in RunStatus if s.is_final]),
            )
        )
        .scalars()
        .all()
    )
    for child_id in children:
        child = _select_run(conn, child_id, lock=True)
        if child is not None and not RunStatus(child["status"]).is_final:
            _cancel(conn, child, now, done, from_parent=True)
    if run["parent_id"] is not None and not from_parent:
        jobs, changed = _child_finished(
            conn,
            run,
            RunStatus.CANCELED,
            now,
            error_code="canceled",
            error_message="the run was canceled",
        )
        done.jobs.extend(jobs)
        done.changed.extend(changed)


def cancel_run(conn: sa.Connection, project_id: str, run_id: str) -> Canceled | str | None:
    """Cancel a run and, for a workflow, its children. ``None`` if there is no
    such run; its status (a string) if it is final already."""
    run = _select_run(conn, run_id, lock=True)
    if run is None or run["project_id"] != project_id:
        return None
    if RunStatus(run["status"]).is_final:
        return str(run["status"])
    done = Canceled()
    _cancel(conn, run, utcnow(), done, from_parent=False)
    return done


# -- time: backoff, delays, expiry ----------------------------------------------------------


def backoff(retry: Mapping[str, Any] | None, attempt: int) -> float:
    """Seconds before the attempt after ``attempt`` (exponential, capped, jittered)."""
    options = {"factor": 2.0, "min_delay": 1.0, "max_delay": 60.0, "jitter": 0.2, **(retry or {})}
    delay = min(options["max_delay"], options["min_delay"] * options["factor"] ** (attempt - 1))
    jitter = options["jitter"]
    return float(max(0.0, delay * (1 + random.uniform(-jitter, jitter))))


def _expired(run: Mapping[str, Any], now: dt.datetime) -> bool:
    return run.get("expire_at") is not None and run["attempt"] == 1 and now >= run["expire_at"]


def _expire(conn: sa.Connection, run: dict[str, Any], now: dt.datetime) -> list[Outgoing]:
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
    return create_run_deliveries(conn, run, lambda: _view(conn, run), "run.expired", now)


@dataclasses.dataclass
class Due:
    """What one scheduler pass set in motion."""

    jobs: list[Job] = dataclasses.field(default_factory=list)
    outgoing: list[Outgoing] = dataclasses.field(default_factory=list)
    changed: list[str] = dataclasses.field(default_factory=list)
    abort: list[str] = dataclasses.field(default_factory=list)


def release_due(conn: sa.Connection, now: dt.datetime, limit: int = 200) -> Due:
    """Move DELAYED and RETRYING runs whose time has come to QUEUED, and end
    QUEUED or DELAYED runs whose TTL ran out as EXPIRED."""
    done = Due()
    for run_id in (
        conn.execute(
            sa.select(runs.c.id)
            .where(
                runs.c.status.in_([RunStatus.QUEUED.value, RunStatus.DELAYED.value]),
                runs.c.expire_at <= now,
            )
            .limit(limit)
        )
        .scalars()
        .all()
    ):
        run = _select_run(conn, run_id, lock=True)
        if run is None or run["status"] not in (RunStatus.QUEUED, RunStatus.DELAYED):
            continue
        done.outgoing.extend(_expire(conn, run, now))
        done.abort.append(run_job_id(run["id"], run["attempt"], run["step"]))
        done.changed.append(run["id"])
    for run_id in (
        conn.execute(
            sa.select(runs.c.id)
            .where(
                runs.c.status.in_([RunStatus.DELAYED.value, RunStatus.RETRYING.value]),
                runs.c.run_at <= now,
            )
            .limit(limit)
        )
        .scalars()
        .all()
    ):
        run = _select_run(conn, run_id, lock=True)
        if run is None or run["status"] not in (RunStatus.DELAYED, RunStatus.RETRYING):
            continue
        transition(conn, run, RunStatus.QUEUED, now, {"run_at": None})
        # A workflow's step takes the nodes' states with it.
        state = node_states(conn, run["id"]) if run["step"] else None
        done.jobs.append(job_of(run, state=state))
        done.changed.append(run["id"])
    return done


def reschedule(
    conn: sa.Connection, project_id: str, run_id: str, run_at: dt.datetime
) -> str | None:
    """Move a DELAYED run's start: ``"ok"``; the status of a run that is not
    DELAYED; ``None`` if there is no such run."""
    run = _select_run(conn, run_id, lock=True)
    if run is None or run["project_id"] != project_id:
        return None
    if run["status"] != RunStatus.DELAYED:
        return str(run["status"])
    conn.execute(
        runs.update()
        .where(runs.c.id == run_id, runs.c.status == RunStatus.DELAYED.value)
        .values(run_at=run_at, updated_at=utcnow())
    )
    return "ok"


# -- creating runs ---------------------------------------------------------------------------

#: A run ended in one of these lets its idempotency key start a new run.
_REUSABLE = (RunStatus.FAILED.value, RunStatus.CANCELED.value, RunStatus.EXPIRED.value)


def _claim_key(conn: sa.Connection, row: Mapping[str, Any], key: str, ttl: float) -> str | None:
    """Point the idempotency key at ``row``'s run; or return the run it already
    names, if that one still counts. :class:`LostRace` if another trigger with
    the same key got there in the same instant."""
    now = row["created_at"]
    expires = now + dt.timedelta(seconds=ttl)
    scope = (
        idempotency_keys.c.project_id == row["project_id"],
        idempotency_keys.c.task == row["task"],
        idempotency_keys.c.key == key,
    )
    existing = conn.execute(sa.select(idempotency_keys).where(*scope)).mappings().first()
    if existing is None:
        values = {
            "project_id": row["project_id"],
            "task": row["task"],
            "key": key,
            "run_id": row["id"],
            "expires_at": expires,
        }
        insert = (
            (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(idempotency_keys)
            .values(**values)
            .on_conflict_do_nothing()
        )
        if conn.execute(insert).rowcount != 1:
            raise LostRace(row["id"])
        return None
    if existing["expires_at"] > now:
        status = conn.scalar(sa.select(runs.c.status).where(runs.c.id == existing["run_id"]))
        if status is not None and status not in _REUSABLE:
            return str(existing["run_id"])
    moved = conn.execute(
        idempotency_keys.update()
        .where(*scope, idempotency_keys.c.run_id == existing["run_id"])
        .values(run_id=row["id"], expires_at=expires)
    )
    if moved.rowcount != 1:
        raise LostRace(row["id"])
    return None


@dataclasses.dataclass(frozen=True)
class NewRun:
    row: dict[str, Any]
    idempotency_ttl: float = 0.0


def create_runs(
    conn: sa.Connection, new: list[NewRun], batch_id: str | None = None
) -> list[tuple[dict[str, Any], bool]]:
    """Insert runs (QUEUED or DELAYED); for each, its view and whether it is an
    earlier run given back for its idempotency key."""
    out: list[tuple[dict[str, Any], bool]] = []
    if batch_id is not None:
        conn.execute(
            batches.insert(),
            {
                "id": batch_id,
                "project_id": new[0].row["project_id"],
                "count": len(new),
                "created_at": utcnow(),
            },
        )
    for item in new:
        row = item.row
        insert_run(conn, row)
        key = row.get("idempotency_key")
        if key:
            cached = _claim_key(conn, row, key, item.idempotency_ttl)
            if cached is not None:
                conn.execute(run_transitions.delete().where(run_transitions.c.run_id == row["id"]))
                conn.execute(runs.delete().where(runs.c.id == row["id"]))
                view = load_run(conn, None, cached)
                assert view is not None
                out.append((view, True))
                continue
        out.append((run_view(row, [], {} if row["task"] == WORKFLOW_TASK else None), False))
    return out
