"""Creating runs (one, or a batch): the idempotency keys that give back an
earlier run, debounce keys that push a DELAYED run back instead of making
another, and admission to the run's queue (``gateway.queues.admission``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from db.engine import savepoint
from db.ids import new_id
from db.models import Batch, IdempotencyKey, RunStatus
from db.rows import owned_row
from db.types import utcnow
from gateway.errors import ValidationFailed
from gateway.queues.admission import admit, admitted_by_insert, insert_admitted
from gateway.queues.slots import QueueRule, default_queue
from gateway.runs.effects import Effects, job_of
from gateway.runs.errors import LostRace, RunNotFound
from gateway.runs.read import load_run, node_states, run_view
from gateway.runs.requests import TriggerOptions
from gateway.runs.runs_table import insert_run, insert_runs, run_transitions, runs
from gateway.runs.workflow import downstream_of, seed_nodes
from jobs import tracing
from jobs.protocol import WORKFLOW_TASK

__all__ = [
    "Created",
    "Debounce",
    "NewRun",
    "create_runs",
    "new_run",
    "replay_from_node",
    "replay_row",
    "reset_idempotency_key",
]

idempotency_keys = IdempotencyKey.__table__  # type: ignore[attr-defined]
batches = Batch.__table__  # type: ignore[attr-defined]

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


def reset_idempotency_key(conn: sa.Connection, project_id: str, task: str, key: str) -> bool:
    """Forget an idempotency key of the project's task, so the next trigger
    with it makes a new run; ``False`` if there was no such key."""
    forgotten = conn.execute(
        idempotency_keys.delete().where(
            idempotency_keys.c.project_id == project_id,
            idempotency_keys.c.task == task,
            idempotency_keys.c.key == key,
        )
    )
    return bool(forgotten.rowcount)


@dataclasses.dataclass(frozen=True)
class Debounce:
    """How a trigger with a debounce key moves the DELAYED run it finds."""

    delay: float
    #: ``leading`` keeps the first trigger's payload; ``trailing`` takes each new one.
    mode: str = "leading"


@dataclasses.dataclass(frozen=True)
class NewRun:
    """A run's row, ready to insert, and how long its idempotency key lasts."""

    row: dict[str, Any]
    idempotency_ttl: float = 0.0
    debounce: Debounce | None = None


@dataclasses.dataclass
class Created:
    """What :func:`create_runs` made: for each new run, its view and whether it
    is an earlier run given back (an idempotency key, or a debounce key that
    pushed an earlier run back); and the jobs of the runs that start now."""

    runs: list[tuple[dict[str, Any], bool]]
    effects: Effects


def _debounced(
    conn: sa.Connection, row: Mapping[str, Any], debounce: Debounce
) -> dict[str, Any] | None:
    """Push back the DELAYED run that holds ``row``'s debounce key, and return
    its view; ``None`` if no run holds it."""
    scope = (
        runs.c.project_id == row["project_id"],
        runs.c.task == row["task"],
        runs.c.debounce_key == row["debounce_key"],
        runs.c.status == RunStatus.DELAYED.value,
    )
    found = (
        conn.execute(sa.select(runs.c.id, runs.c.debounce_until).where(*scope).with_for_update())
        .mappings()
        .first()
    )
    if found is None:
        return None
    now = row["created_at"]
    run_at = now + dt.timedelta(seconds=debounce.delay)
    if found["debounce_until"] is not None:
        run_at = min(run_at, found["debounce_until"])
    values: dict[str, Any] = {"run_at": run_at, "updated_at": now}
    if debounce.mode == "trailing":
        values.update(payload=row["payload"], tags=row["tags"], metadata=row["metadata"])
    moved = conn.execute(runs.update().where(runs.c.id == found["id"], *scope).values(values))
    if moved.rowcount != 1:
        raise LostRace(found["id"])
    view = load_run(conn, None, found["id"])
    assert view is not None
    view["debounced"] = True
    return view


def create_runs(conn: sa.Connection, new: list[NewRun], batch_id: str | None = None) -> Created:
    """Insert runs (QUEUED or DELAYED); a QUEUED one starts now unless its
    queue holds it (``gateway.queues.admission.admit``)."""
    out: list[tuple[dict[str, Any], bool]] = []
    effects = Effects()
    rules: dict[tuple[str, str], QueueRule] = {}
    #: Runs with no key to claim: inserted together, as sets (``insert_runs``).
    plain: list[dict[str, Any]] = []
    #: Those of them that their INSERT admits (PostgreSQL: ``insert_admitted``).
    admitting: list[dict[str, Any]] = []
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
        if item.debounce is not None:
            view = _debounced(conn, row, item.debounce)
            if view is not None:
                out.append((view, True))
                continue
        key = row.get("idempotency_key")
        if item.debounce is None and not key and admitted_by_insert(conn, row):
            admitting.append(row)
            out.append((_new_view(row), False))
            continue
        starts = row["status"] == RunStatus.QUEUED.value and admit(conn, row, rules)
        if item.debounce is not None:
            try:
                with savepoint(conn):
                    insert_run(conn, row)
            except IntegrityError:  # another trigger made the key's run this instant
                raise LostRace(row["id"]) from None
        elif key:
            insert_run(conn, row)
        else:  # nothing to look up: inserted with the others below
            plain.append(row)
        if key:
            cached = _claim_key(conn, row, key, item.idempotency_ttl)
            if cached is not None:
                conn.execute(run_transitions.delete().where(run_transitions.c.run_id == row["id"]))
                conn.execute(runs.delete().where(runs.c.id == row["id"]))
                view = load_run(conn, None, cached)
                assert view is not None
                out.append((view, True))
                continue
        if starts:
            effects.jobs.append(job_of(row))
        out.append((_new_view(row), False))
    insert_runs(conn, plain)
    starting = insert_admitted(conn, admitting)
    effects.jobs += [job_of(row) for row in admitting if row["id"] in starting]
    return Created(out, effects)


def _new_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """The view of a run just created: no attempts yet (a workflow: no nodes)."""
    return run_view(row, [], {} if row["task"] == WORKFLOW_TASK else None)


def replay_row(original: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """A new run of ``original``'s task, payload and options, QUEUED in the
    same queue, with ``replayed_from``."""
    return {
        "id": new_id("run"),
        "project_id": original["project_id"],
        "task": original["task"],
        "status": RunStatus.QUEUED.value,
        "attempt": 1,
        "payload": original["payload"],
        "output": None,
        "error_code": None,
        "error_message": None,
        "tags": list(original["tags"] or []),
        "metadata": dict(original["metadata"] or {}),
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
        "callback_url": original["callback_url"],
        "step": 0,
        "step_pending": False,
        "parent_id": None,
        "node_id": None,
        "run_at": None,
        "expire_at": None,
        "max_attempts": original["max_attempts"],
        "retry": original["retry"],
        "max_duration": original["max_duration"],
        "idempotency_key": None,
        "replayed_from": original["id"],
        "traceparent": tracing.mint(
            f"new run {original['task']}", links=[original.get("traceparent")]
        ),
        "batch_id": None,
        "queue": original["queue"],
        "concurrency_key": original["concurrency_key"],
        "priority": original["priority"],
        "order_at": now - dt.timedelta(seconds=original["priority"] or 0),
    }


def new_run(
    project_id: str,
    task: str,
    payload: Any,
    options: TriggerOptions,
    *,
    now: dt.datetime,
    callback_url: str | None,
    field: str = "options",
    replayed_from: str | None = None,
    traceparent: str | None = None,
    links: Sequence[str | None] = (),
) -> NewRun:
    """The row of a new run from a trigger's options (``callback_url`` checked
    already), due now, after its delay, or debounced. ``traceparent``: the
    span that made it (a trigger request's); else a root span is made here,
    linked to ``links`` (a parent run's), when tracing is on (``jobs.tracing``).

    :raises ValidationFailed: options that do not go together
    """
    run_at = None
    if options.delay is not None:
        run_at = (
            options.delay
            if isinstance(options.delay, dt.datetime)
            else now + dt.timedelta(seconds=options.delay)
        )
        if run_at <= now:
            run_at = None
    debounce = options.debounce
    if debounce is not None:
        if options.delay is not None:
            raise ValidationFailed(
                details=[
                    {
                        "path": f"{field}.delay",
                        "type": "value_error",
                        "message": "a debounced run's start is set by debounce.delay; "
                        "give one or the other",
                    }
                ]
            )
        run_at = now + dt.timedelta(seconds=debounce.delay)
    row: dict[str, Any] = {
        "id": new_id("run"),
        "project_id": project_id,
        "task": task,
        "status": (RunStatus.DELAYED if run_at else RunStatus.QUEUED).value,
        "attempt": 1,
        "payload": payload,
        "output": None,
        "error_code": None,
        "error_message": None,
        "tags": options.tags,
        "metadata": options.metadata,
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
        "callback_url": callback_url,
        "step": 0,
        "step_pending": False,
        "parent_id": None,
        "node_id": None,
        "run_at": run_at,
        "expire_at": now + dt.timedelta(seconds=options.ttl) if options.ttl else None,
        "max_attempts": options.max_attempts,
        "retry": options.retry.model_dump(),
        "max_duration": options.max_duration,
        "idempotency_key": options.idempotency_key,
        "replayed_from": replayed_from,
        "batch_id": None,
        "queue": options.queue or default_queue(task)[0],
        "concurrency_key": options.concurrency_key,
        "priority": options.priority,
        "order_at": now - dt.timedelta(seconds=options.priority),
        "traceparent": traceparent or tracing.mint(f"new run {task}", links=links),
        "debounce_key": debounce.key if debounce else None,
        "debounce_until": (
            now + dt.timedelta(seconds=max(debounce.max_delay, debounce.delay))
            if debounce
            else None
        ),
    }
    return NewRun(
        row,
        options.idempotency_key_ttl,
        Debounce(debounce.delay, debounce.mode) if debounce else None,
    )


def replay_from_node(
    conn: sa.Connection, project_id: str, run_id: str, from_node: str, now: dt.datetime
) -> Created:
    """A new run of a workflow that reuses the output of every node its first
    run completed, but ``from_node`` and what follows it, which run again.

    :raises RunNotFound: no such run in the project
    :raises ValidationFailed: not a workflow, or no such node in its graph
    """
    original = owned_row(conn, runs, run_id, project_id, RunNotFound(run_id))
    graph = original["payload"] if isinstance(original["payload"], dict) else {}
    ids = {n.get("id") for n in graph.get("nodes", []) if isinstance(n, dict)}
    problem = None
    if original["task"] != WORKFLOW_TASK:
        problem = f"from_node replays a workflow; run {run_id} is a {original['task']!r} run"
    elif from_node not in ids:
        problem = (
            f"the workflow has no node {from_node!r}; its nodes: {', '.join(sorted(map(str, ids)))}"
        )
    if problem is not None:
        raise ValidationFailed(
            problem, details=[{"path": "from_node", "type": "unknown_node", "message": problem}]
        )
    again = downstream_of(graph, from_node)
    reused = {
        node_id: state
        for node_id, state in node_states(conn, run_id).items()
        if node_id not in again and state["status"] == "completed"
    }
    row = replay_row(original, now)
    created = create_runs(conn, [NewRun(row)])
    seed_nodes(conn, row["id"], reused, now)
    # Its first step plans with the reused nodes (a held run's pump adds them too).
    created.effects.jobs = [
        dataclasses.replace(job, state=node_states(conn, job.run_id))
        if job.run_id == row["id"]
        else job
        for job in created.effects.jobs
    ]
    [(view, _)] = created.runs
    view.update(load_run(conn, None, row["id"]) or {})
    return created
