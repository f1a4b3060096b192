"""The compare-and-set at the heart of the state machine, and the statements built once.

Every change of a run's status goes through :func:`transition`: an UPDATE
that names the status, attempt and step it expects (docs/architecture.md,
invariant 3), logged in ``run_transitions``. A duplicate, late or replayed
report finds the run elsewhere and changes nothing; a process that lost a race
gets :class:`~gateway.runs.errors.LostRace` and runs its unit again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSON, aggregate_order_by

from db.many import execute_many
from db.models import Run, RunAttempt, RunNode, RunStatus, RunTransition
from gateway.runs.errors import LostRace
from jobs.protocol import WorkerEvent

__all__ = [
    "ACTIVE",
    "OBSERVED",
    "PUMPS",
    "KeepFirst",
    "insert_run",
    "insert_runs",
    "is_current",
    "observe_inserted",
    "run_attempts",
    "run_nodes",
    "run_transitions",
    "run_values",
    "runs",
    "select_run",
    "transition",
    "transition_all",
    "transitioned",
]

runs = Run.__table__  # type: ignore[attr-defined]
run_attempts = RunAttempt.__table__  # type: ignore[attr-defined]
run_transitions = RunTransition.__table__  # type: ignore[attr-defined]
run_nodes = RunNode.__table__  # type: ignore[attr-defined]

ACTIVE = (RunStatus.QUEUED, RunStatus.EXECUTING)

#: ``conn.info`` key: the (project, queue) pairs whose slots this unit of work
#: changed, pumped at its end (``gateway.queues.admission``).
PUMPS = "gateway.flow.pumps"
#: ``conn.info`` key: the transitions this unit made, counted in the metrics
#: once it has committed (a unit rolled back and run again counts once).
OBSERVED = "gateway.runs.observed"


# Statements built once.
#
# The hot units (a trigger, a worker event, a read of a run) run the same few
# statements thousands of times a second. Building a statement and its cache
# key costs more CPU than SQLite takes to run it, so these are built once, with
# bound parameters, and only their values change.

_P = sa.bindparam
_HOLDING = (RunStatus.QUEUED.value, RunStatus.EXECUTING.value)


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
    "queue",
    "concurrency_key",
    "priority",
    "gated",
    "held",
    "traceparent",
)
_SELECT_RUN = sa.select(*(runs.c[f] for f in _RUN_FIELDS)).where(runs.c.id == _P("run_id"))
_SELECT_RUN_LOCKED = _SELECT_RUN.with_for_update()
#: A run, and whether it has nodes (a workflow's, or a durable task's steps),
#: in one round trip: most runs have none, and their view asks for no more.
_HAS_NODES = (
    sa.exists().where(run_nodes.c.parent_id == runs.c.id).correlate(runs).label("has_nodes")
)
LOAD_RUN = sa.select(runs, _HAS_NODES).where(runs.c.id == _P("run_id"))
LOAD_OWN_RUN = LOAD_RUN.where(runs.c.project_id == _P("project_id"))
LOAD_ATTEMPTS = (
    sa.select(run_attempts)
    .where(run_attempts.c.run_id == _P("run_id"))
    .order_by(run_attempts.c.number)
)


def _many(column: sa.ColumnElement[Any], dialect: str) -> sa.ColumnElement[bool]:
    """``column`` in the bound list ``run_ids``: on PostgreSQL ``= ANY`` of one
    array, one prepared statement whatever the list's length."""
    if dialect == "postgresql":
        return column == sa.any_(_P("run_ids", type_=ARRAY(sa.String())))
    return column.in_(_P("run_ids", expanding=True))


#: The same reads for many runs at once, by dialect.
LOAD_RUNS = {
    d: sa.select(runs, _HAS_NODES).where(_many(runs.c.id, d)) for d in ("postgresql", "sqlite")
}
#: PostgreSQL's: the runs with their attempts (``attempts_json``, in order) in
#: one round trip; times come as ISO text (``read.load_views`` parses them).
_ATTEMPT_FIELDS = (
    "number",
    "status",
    "worker_id",
    "started_at",
    "finished_at",
    "error_code",
    "error_message",
)
_ATTEMPT_PAIRS: list[sa.ColumnElement[Any]] = []
for _name in _ATTEMPT_FIELDS:
    _ATTEMPT_PAIRS += [sa.literal_column(f"'{_name}'"), run_attempts.c[_name]]
del _name
_ATTEMPTS_JSON = (
    sa.select(
        sa.func.coalesce(
            sa.func.json_agg(
                aggregate_order_by(
                    sa.func.json_build_object(*_ATTEMPT_PAIRS), run_attempts.c.number
                )
            ),
            sa.literal_column("'[]'::json"),
            type_=JSON(),
        )
    )
    .where(run_attempts.c.run_id == runs.c.id)
    .correlate(runs)
    .scalar_subquery()
    .label("attempts_json")
)
LOAD_RUNS_WITH_ATTEMPTS = sa.select(runs, _HAS_NODES, _ATTEMPTS_JSON).where(
    _many(runs.c.id, "postgresql")
)
LOAD_RUNS_ATTEMPTS = {
    d: sa.select(run_attempts)
    .where(_many(run_attempts.c.run_id, d))
    .order_by(run_attempts.c.run_id, run_attempts.c.number)
    for d in ("postgresql", "sqlite")
}
SELECT_RUNS = {
    d: sa.select(*(runs.c[f] for f in _RUN_FIELDS)).where(_many(runs.c.id, d))
    for d in ("postgresql", "sqlite")
}
INSERT_RUN = runs.insert()
INSERT_TRANSITION = run_transitions.insert()
INSERT_ATTEMPT = run_attempts.insert()
FINISH_ATTEMPT = (
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


def observe_inserted(conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Count new runs' first statuses once the unit commits (``OBSERVED``)."""
    for row in rows:
        _observe(conn, row, RunStatus(row["status"]), row["created_at"])


def _observe(conn: sa.Connection, run: Mapping[str, Any], to: RunStatus, now: dt.datetime) -> None:
    fields = {k: run.get(k) for k in ("task", "created_at", "started_at")}
    conn.info.setdefault(OBSERVED, []).append((fields, to, now))


@functools.cache
def _insert_run_logged(columns: frozenset[str]) -> sa.Insert:
    """PostgreSQL: the run's INSERT and its first transition's in one
    statement (a data-modifying CTE), so a trigger costs one round trip less."""
    new = (
        runs.insert()
        .values({name: sa.bindparam(name, type_=runs.c[name].type) for name in sorted(columns)})
        .returning(runs.c.id, runs.c.status, runs.c.attempt, runs.c.created_at)
        .cte("new_run")
    )
    logged: sa.Insert = run_transitions.insert().from_select(
        ["run_id", "from_status", "to_status", "attempt", "at"],
        sa.select(
            new.c.id,
            sa.null().label("from_status"),
            new.c.status,
            new.c.attempt,
            new.c.created_at,
        ),
    )
    return logged


def insert_run(conn: sa.Connection, row: Mapping[str, Any]) -> None:
    """Insert a new run and log its first status (one statement on PostgreSQL)."""
    values = run_values(row)
    if conn.dialect.name == "postgresql":
        conn.execute(_insert_run_logged(frozenset(values)), values)
    else:
        _insert_run_then_log(conn, values)
    _observe(conn, row, RunStatus(row["status"]), row["created_at"])


def insert_runs(conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """:func:`insert_run` for many runs: the rows of each set of columns in
    one ``executemany`` (on PostgreSQL the statement that logs the first
    transition too, the set sent in one round trip), so a group of triggers
    costs a few statements, not two per run."""
    if len(rows) <= 1:
        for row in rows:
            insert_run(conn, row)
        return
    shapes: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:
        values = run_values(row)
        shapes.setdefault(frozenset(values), []).append(values)
    postgresql = conn.dialect.name == "postgresql"
    for columns, shaped in shapes.items():
        if postgresql:
            conn.execute(_insert_run_logged(columns), shaped)
            continue
        execute_many(conn, INSERT_RUN, shaped)
        execute_many(conn, INSERT_TRANSITION, [_first_transition(v) for v in shaped])
    observe_inserted(conn, rows)


def run_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """The values a new run's row is inserted with (its queue, priority and
    start order filled in)."""
    values = {"queue": row["task"], "priority": 0, **row}
    if values.get("order_at") is None:
        values["order_at"] = values["created_at"] - dt.timedelta(seconds=values["priority"])
    return values


def _first_transition(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "run_id": row["id"],
        "from_status": None,
        "to_status": row["status"],
        "attempt": row["attempt"],
        "at": row["created_at"],
    }


def _insert_run_then_log(conn: sa.Connection, row: Mapping[str, Any]) -> None:
    """SQLite (where a statement is a function call, not a round trip): the
    run's INSERT, then its first transition's."""
    conn.execute(INSERT_RUN, row)
    conn.execute(INSERT_TRANSITION, _first_transition(row))


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
    conn.execute(INSERT_TRANSITION, transitioned(conn, run, to, now))


def transition_all(
    conn: sa.Connection,
    moves: Sequence[tuple[Mapping[str, Any], RunStatus, Mapping[str, Any]]],
    now: dt.datetime,
) -> None:
    """:func:`transition` for many runs, each ``(run, to, values)``: one
    compare-and-set per shape of change sent as one ``executemany``, and one
    INSERT of all their transitions; :class:`LostRace` if any run moved."""
    shapes: dict[tuple[tuple[str, ...], frozenset[str]], list[dict[str, Any]]] = {}
    for run, to, values in moves:
        changes = {"status": to.value, "updated_at": now, **values}
        first = frozenset(k for k, v in changes.items() if isinstance(v, KeepFirst))
        params = {f"v_{k}": v.value if isinstance(v, KeepFirst) else v for k, v in changes.items()}
        params.update(
            w_id=run["id"], w_status=run["status"], w_attempt=run["attempt"], w_step=run["step"]
        )
        shapes.setdefault((tuple(changes), first), []).append(params)
    for (names, first), params_list in shapes.items():
        if execute_many(conn, _cas_update(names, first), params_list) != len(params_list):
            raise LostRace(params_list[0]["w_id"])
    if moves:
        execute_many(
            conn, INSERT_TRANSITION, [transitioned(conn, run, to, now) for run, to, _ in moves]
        )


def transitioned(
    conn: sa.Connection, run: Mapping[str, Any], to: RunStatus, now: dt.datetime
) -> dict[str, Any]:
    """What follows a compare-and-set that moved ``run`` to ``to``: the slot
    it frees handed on, the change counted; its ``run_transitions`` row."""
    if run.get("gated") and run["status"] in _HOLDING and to.value not in _HOLDING:
        # A slot of its queue frees: hand it on before this unit commits.
        conn.info.setdefault(PUMPS, set()).add((run["project_id"], run["queue"]))
    _observe(conn, run, to, now)
    return {
        "run_id": run["id"],
        "from_status": run["status"],
        "to_status": to.value,
        "attempt": run["attempt"],
        "at": now,
    }


def select_run(conn: sa.Connection, run_id: str, *, lock: bool = False) -> dict[str, Any] | None:
    query = _SELECT_RUN_LOCKED if lock else _SELECT_RUN
    row = conn.execute(query, {"run_id": run_id}).mappings().first()
    return dict(row) if row is not None else None


def is_current(run: Mapping[str, Any], event: WorkerEvent) -> bool:
    return bool(run["attempt"] == event.attempt and run["step"] == event.step)
