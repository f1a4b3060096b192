"""Flow control: who may start, decided in the database (limits, keys, priority, pauses).

The database is the judge (docs/architecture.md, "Flow control"). A run whose
queue has a limit, or is paused, is *gated*: when it becomes QUEUED it is
*held* in the database, not put on Redis, and the queue is *pumped* at the end
of the same unit of work: the queue's row is locked (so two gateway processes
never hand out the same slot), its free slots are counted from the runs that
hold one, and that many held runs are handed to arq, oldest first by
``order_at`` (``created_at`` less ``priority``), round-robin across
concurrency keys. A gated run that stops holding a slot (it ends, waits, is
retried later) asks for its queue to be pumped again in its own transaction.

Redis never holds a decision: a held run is a row, so a flushed Redis loses
none, and the reconciler pumps every queue with held runs on each pass, which
also covers a pump that a crash kept from running.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, Generic, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from db.models import RunStatus
from gateway.queues.slots import (
    QueueRule,
    default_queue,
    in_queue,
    insert_queue,
    key_is,
    running_by_key,
    select_queue,
)
from gateway.runs.effects import Job
from gateway.runs.read import JOB_COLUMNS, run_job
from gateway.runs.runs_table import OBSERVED, PUMPS, observe_inserted, run_values, runs

__all__ = [
    "Flowed",
    "admit",
    "admitted_by_insert",
    "any_held",
    "flowing",
    "insert_admitted",
    "pump",
    "pump_held",
    "queue_rule",
    "request_pump",
]

T = TypeVar("T")

_QUEUED = RunStatus.QUEUED.value
_EXECUTING = RunStatus.EXECUTING.value
#: Keys served in one pump, oldest first; the rest wait for the next.
MAX_KEYS = 200
#: Runs handed out in one pump at the most.
MAX_HANDED = 500


def queue_rule(
    conn: sa.Connection,
    project_id: str,
    name: str,
    task: str | None = None,
    cache: MutableMapping[tuple[str, str], QueueRule] | None = None,
) -> QueueRule:
    """The queue's rule as the database has it. A task's own queue that has no
    row yet gets one with the task's declared limit, so it is listed and can be
    changed like any other."""
    key = (project_id, name)
    if cache is not None and key in cache:
        return cache[key]
    row = conn.execute(select_queue, {"project_id": project_id, "name": name}).mappings().first()
    if row is None and task is not None:
        own, limit = default_queue(task)
        if own == name and limit is not None:
            now = dt.datetime.now(dt.UTC)
            insert_queue(
                conn,
                {
                    "project_id": project_id,
                    "name": name,
                    "concurrency_limit": limit,
                    "paused": False,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            row = (
                conn.execute(select_queue, {"project_id": project_id, "name": name})
                .mappings()
                .first()
            )
    # A queue a trigger names that the project does not have gets no row: it
    # has no limit and is not paused, it is listed while runs are in it, and
    # a PATCH that gives it a limit makes its row. (Rows for every name a
    # trigger ever gave grew without bound: 3,000 names, 3,000 rows.)
    rule = QueueRule() if row is None else QueueRule(row["concurrency_limit"], row["paused"])
    if cache is not None:
        cache[key] = rule
    return rule


def request_pump(conn: sa.Connection, project_id: str, queue: str) -> None:
    conn.info.setdefault(PUMPS, set()).add((project_id, queue))


def admit(
    conn: sa.Connection,
    run: MutableMapping[str, Any],
    cache: MutableMapping[tuple[str, str], QueueRule] | None = None,
) -> bool:
    """Decide for a run that becomes QUEUED: ``True``, hand its job to arq now;
    ``False``, its queue is gated, so the run is held (``run["held"]``) until
    the pump at the end of this unit, or a later one, finds it a slot.

    Sets ``gated`` and ``held`` on ``run``: the caller writes them with it.
    """
    if not run.get("queue"):
        run["queue"] = default_queue(run["task"])[0]
    rule = queue_rule(conn, run["project_id"], run["queue"], run["task"], cache)
    run["gated"] = run["held"] = rule.gated
    if rule.gated:
        request_pump(conn, run["project_id"], run["queue"])
    return not rule.gated


def admitted_by_insert(conn: sa.Connection, run: MutableMapping[str, Any]) -> bool:
    """Whether :func:`insert_admitted` can decide for this new run: on
    PostgreSQL, a QUEUED run whose queue is not its task's own queue with a
    declared limit (whose missing row :func:`queue_rule` makes first). Sets
    the run's queue if it has none, as :func:`admit` does."""
    if conn.dialect.name != "postgresql" or run["status"] != _QUEUED:
        return False
    own, limit = default_queue(run["task"])
    if not run.get("queue"):
        run["queue"] = own
    return not (run["queue"] == own and limit is not None)


def insert_admitted(conn: sa.Connection, rows: Sequence[MutableMapping[str, Any]]) -> set[str]:
    """Insert new QUEUED runs (PostgreSQL, :func:`admitted_by_insert`) with
    their first transitions, each admitted by the INSERT itself: gated and
    held if its queue's row has a limit or is paused, as :func:`admit`
    decides from a read of that row. One round trip for the lot, where a
    read of the queues and the INSERT were two (docs/performance.md). Sets
    ``gated`` and ``held`` on each row, asks for the pumps of the queues that
    hold one, and returns the IDs of the runs to start now."""
    if not rows:
        return set()
    shapes: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:
        values = run_values(row)
        shapes.setdefault(frozenset(values), []).append(values)
    held: set[str] = set()
    for columns, shaped in shapes.items():
        params = {"rows": _recordset(shaped)}
        held.update(
            run_id for run_id, is_held in conn.execute(_insert_admitted(columns), params) if is_held
        )
    for row in rows:
        row["gated"] = row["held"] = row["id"] in held
        if row["held"]:
            request_pump(conn, row["project_id"], row["queue"])
    observe_inserted(conn, rows)
    return {row["id"] for row in rows if not row["held"]}


@functools.cache
def _insert_admitted(columns: frozenset[str]) -> sa.TextClause:
    """:func:`insert_admitted`'s statement for rows of ``columns``: the rows
    as one JSON array (``jsonb_to_recordset``), each joined to its queue's
    row, inserted with ``gated`` and ``held``, and their transitions logged
    (a data-modifying CTE, as ``runs_table.insert_run``). A JSON column's
    ``None`` is stored as JSON ``null``, as SQLAlchemy's JSON type stores it."""
    names = sorted(columns - {"gated", "held"})
    pg = postgresql.dialect()  # type: ignore[no-untyped-call]

    def kind(name: str) -> str:
        column_type = runs.c[name].type
        return "jsonb" if isinstance(column_type, sa.JSON) else column_type.compile(dialect=pg)

    def picked(name: str) -> str:
        if isinstance(runs.c[name].type, sa.JSON):
            return f"COALESCE(v.\"{name}\", 'null'::jsonb)"
        return f'v."{name}"'

    quoted = ", ".join(f'"{name}"' for name in names)
    return sa.text(
        f"""
        WITH v AS (
            SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb))
                AS x({", ".join(f'"{name}" {kind(name)}' for name in names)})
        ), new_run AS (
            INSERT INTO runs ({quoted}, gated, held)
            SELECT {", ".join(picked(name) for name in names)},
                COALESCE(q.gated, false), COALESCE(q.gated, false)
            FROM v LEFT JOIN LATERAL (
                SELECT queues.paused OR queues.concurrency_limit IS NOT NULL AS gated
                FROM queues
                WHERE queues.project_id = v.project_id AND queues.name = v.queue
            ) AS q ON true
            RETURNING runs.id, runs.status, runs.attempt, runs.created_at, runs.held
        ), logged AS (
            INSERT INTO run_transitions (run_id, from_status, to_status, attempt, at)
            SELECT id, NULL, status, attempt, created_at FROM new_run
        )
        SELECT id, held FROM new_run
        """
    )


def _recordset(rows: list[dict[str, Any]]) -> str:
    """Rows as the JSON array ``jsonb_to_recordset`` reads: times in ISO 8601,
    an integer past 64 bits through the standard library."""
    try:
        return orjson.dumps(rows).decode()
    except TypeError:
        return json.dumps(rows, default=_iso, separators=(",", ":"), ensure_ascii=False)


def _iso(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def pump(conn: sa.Connection, project_id: str, queue: str, now: dt.datetime) -> list[Job]:
    """Hand as many of the queue's held runs to arq as it has free slots, and
    return their jobs (to queue after the commit).

    Oldest ``order_at`` first within a key; across keys, one run from each in
    turn (the key whose oldest run waited longest goes first), so one key's
    backlog never starves another.
    """
    found = (
        conn.execute(select_queue.with_for_update(), {"project_id": project_id, "name": queue})
        .mappings()
        .first()
    )
    rule = QueueRule() if found is None else QueueRule(found["concurrency_limit"], found["paused"])
    if rule.paused:
        return []
    held = (*in_queue(project_id, queue), runs.c.status == _QUEUED, runs.c.held.is_(True))
    keys = [
        key
        for key, _ in conn.execute(
            sa.select(runs.c.concurrency_key, sa.func.min(runs.c.order_at).label("first"))
            .where(*held)
            .group_by(runs.c.concurrency_key)
            .order_by(sa.literal_column("first"))
            .limit(MAX_KEYS)
        )
    ]
    if not keys:
        return []
    running = running_by_key(conn, project_id, queue) if rule.limit is not None else {}
    picks: list[list[str]] = []
    for key in keys:
        free = MAX_HANDED if rule.limit is None else rule.limit - running.get(key, 0)
        if free <= 0:
            continue
        picks.append(
            list(
                conn.execute(
                    sa.select(runs.c.id)
                    .where(*held, key_is(key))
                    .order_by(runs.c.order_at, runs.c.id)
                    .limit(min(free, MAX_HANDED))
                    # A run another transaction has locked is being changed
                    # (canceled, say): passed over, not waited for, so a pump
                    # never waits on a run whose holder waits on this queue.
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
        )
    order: list[str] = []
    for turn in range(max((len(p) for p in picks), default=0)):
        order.extend(p[turn] for p in picks if turn < len(p))
    order = order[:MAX_HANDED]
    if not order:
        return []
    handed = conn.execute(
        runs.update()
        .where(runs.c.id.in_(order), runs.c.status == _QUEUED, runs.c.held.is_(True))
        .values(held=False, updated_at=now)
        .returning(*JOB_COLUMNS)
    )
    rows = {r["id"]: dict(r) for r in handed.mappings()}
    return [run_job(conn, rows[i]) for i in order if i in rows]


def pump_requested(conn: sa.Connection, now: dt.datetime) -> list[Job]:
    """Pump the queues this unit asked for, in a fixed order (so two
    transactions lock the same queues in the same order)."""
    wanted = conn.info.pop(PUMPS, None)
    jobs: list[Job] = []
    for project_id, queue in sorted(wanted or ()):
        jobs.extend(pump(conn, project_id, queue, now))
    return jobs


@dataclasses.dataclass(frozen=True)
class Flowed(Generic[T]):
    """What a unit run by :func:`flowing` hands back: its result, the jobs of
    the runs its pumps handed out, and the transitions it made (to count once
    it has committed)."""

    result: T
    jobs: list[Job]
    observed: list[tuple[dict[str, Any], RunStatus, dt.datetime]]


def flowing(fn: Callable[..., T]) -> Callable[..., Flowed[T]]:
    """``fn`` as a unit that then pumps the queues it asked for."""

    @functools.wraps(fn)
    def unit(conn: sa.Connection, *args: Any, **kwargs: Any) -> Flowed[T]:
        conn.info.pop(PUMPS, None)
        conn.info.pop(OBSERVED, None)
        try:
            result = fn(conn, *args, **kwargs)
            jobs = pump_requested(conn, dt.datetime.now(dt.UTC))
            return Flowed(result, jobs, conn.info.pop(OBSERVED, []))
        finally:
            conn.info.pop(PUMPS, None)
            conn.info.pop(OBSERVED, None)

    return unit


_ANY_HELD = sa.select(sa.exists().where(runs.c.status == _QUEUED, runs.c.held.is_(True)))


def any_held(conn: sa.Connection) -> bool:
    """Whether some queue holds runs (a read): the reconciler's pass pumps
    only then, so an idle gateway opens no write transaction for it."""
    return bool(conn.scalar(_ANY_HELD))


def pump_held(conn: sa.Connection, now: dt.datetime, limit: int = 100) -> list[Job]:
    """Pump every queue that has held runs (the reconciler's pass)."""
    found = conn.execute(
        sa.select(runs.c.project_id, runs.c.queue)
        .where(runs.c.status == _QUEUED, runs.c.held.is_(True))
        .group_by(runs.c.project_id, runs.c.queue)
        .order_by(runs.c.project_id, runs.c.queue)
        .limit(limit)
    )
    jobs: list[Job] = []
    for project_id, queue in list(found):
        jobs.extend(pump(conn, project_id, queue, now))
    return jobs
