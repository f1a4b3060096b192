"""A batch of worker reports applied as sets.

The common reports (an attempt started; a run with no parent, no steps and no
retry left ended; a running attempt's heartbeat) are applied kind by kind. On
PostgreSQL, one compare-and-set UPDATE for all the runs of a kind (``UPDATE …
FROM unnest(…)``), which also writes their transitions and begins or ends
their attempts (data-modifying CTEs). On SQLite, one ``executemany`` of the
compare-and-set per kind, checked by its row count, then one INSERT of all
their transitions, one ``executemany`` ending their attempts and one INSERT of
the attempts begun. Their deliveries go in with PostgreSQL's last
compare-and-set (``_DELIVERED``), in one INSERT after SQLite's. One by one, a
report costs five to eight statements; here a batch costs about four on
PostgreSQL and ten on SQLite. Every other report, and a
second report about a run already in the batch, goes one by one after them
(``one_by_one.apply_event``).

What each writes is what ``one_by_one.apply_event`` writes for it: the same
compare-and-set on status, attempt and step, the same transition row, the same
attempt, the same deliveries in the same transaction. A run that moved in the
meantime raises :class:`LostRace`, and the caller applies the batch again one
report at a time (docs/architecture.md, invariant 3).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from db.many import execute_many
from db.models import RunStatus
from db.types import UTCDateTime, json_text, utcnow
from gateway.runs.effects import Effects, EventAnswer
from gateway.runs.errors import LostRace
from gateway.runs.read import load_rows, view_of_row, with_attempts
from gateway.runs.runs_table import (
    ACTIVE,
    FINISH_ATTEMPT,
    INSERT_ATTEMPT,
    LOAD_RUNS_WITH_ATTEMPTS,
    SELECT_RUNS,
    KeepFirst,
    is_current,
    runs,
    transition_all,
    transitioned,
)
from gateway.runs.timers import expired
from jobs.protocol import TIMED_OUT_CODE, WORKFLOW_TASK, WorkerEvent
from webhooks.outbox import FINAL_EVENTS, RunDeliveries, endpoints_of_runs

__all__ = ["apply_in_sets"]

_NOW = sa.bindparam("now", type_=UTCDateTime())

# Each compare-and-set writes the transitions of the runs it moved in the
# same statement (``logged``), as ``transition_all`` does in a second one,
# and the attempts it began or ended (``begun``, ``ended``): a statement is a
# round trip, and a report's answer waits for each.
#
# Each reads its runs by primary key (``runs.id = ANY(:ids)``, which the
# unique index says is at most one row an ID, statistics or not) and compares
# a run's status with the one in its row of the set (``v``), never with a
# constant: ``runs.status = 'QUEUED'`` let the planner read the runs through
# the status index, which the statistics make look selective while a backlog
# makes it a scan of every queued run (16 to 25 ms a batch with 8,000 queued,
# docs/performance.md). Without the ``ANY``, a table never analyzed got a
# nested loop of every run against every row of the set (20 ms for 2,200 runs).
_START_CTES = """
    WITH moved AS (
        UPDATE runs SET status = 'EXECUTING', updated_at = :now,
            started_at = COALESCE(runs.started_at, :now), heartbeat_at = :now
        FROM unnest(
            CAST(:ids AS varchar[]), CAST(:froms AS varchar[]), CAST(:attempts AS integer[]),
            CAST(:workers AS varchar[])
        ) AS v(id, w_status, attempt, worker_id)
        WHERE runs.id = ANY(CAST(:ids AS varchar[])) AND runs.id = v.id
            AND runs.status = v.w_status AND runs.attempt = v.attempt
            AND runs.step = 0
        RETURNING runs.id, runs.attempt, v.worker_id
    ), logged AS (
        INSERT INTO run_transitions (run_id, from_status, to_status, attempt, at)
        SELECT id, 'QUEUED', 'EXECUTING', attempt, :now FROM moved
    ), begun AS (
        INSERT INTO run_attempts (run_id, number, status, worker_id, started_at)
        SELECT id, attempt, 'EXECUTING', worker_id, :now FROM moved
    )"""
_START_SELECT = """
    SELECT id FROM moved
    """

# A run that completes keeps the error of an earlier attempt's failure, as
# ``transition`` leaves columns it is not given. The moved runs' attempts end in
# the same statement (``ended``); one whose ``started`` report has not come
# yet has no row to end, and is inserted ended (``_record_attempts``).
_FINISH_CTES = """
    WITH moved AS (
        UPDATE runs SET status = v.status, updated_at = :now,
            output = CAST(v.output AS jsonb),
            error_code = CASE WHEN v.status = 'COMPLETED' THEN runs.error_code
                ELSE v.error_code END,
            error_message = CASE WHEN v.status = 'COMPLETED' THEN runs.error_message
                ELSE v.error_message END,
            started_at = COALESCE(runs.started_at, :now), finished_at = :now
        FROM unnest(
            CAST(:ids AS varchar[]), CAST(:froms AS varchar[]), CAST(:attempts AS integer[]),
            CAST(:tos AS varchar[]), CAST(:outputs AS text[]), CAST(:codes AS text[]),
            CAST(:messages AS text[])
        ) AS v(id, w_status, attempt, status, output, error_code, error_message)
        WHERE runs.id = ANY(CAST(:ids AS varchar[])) AND runs.id = v.id
            AND runs.status = v.w_status AND runs.attempt = v.attempt
            AND runs.step = 0
        RETURNING runs.id, v.w_status, v.status, runs.attempt,
            v.error_code AS w_code, v.error_message AS w_message
    ), logged AS (
        INSERT INTO run_transitions (run_id, from_status, to_status, attempt, at)
        SELECT id, w_status, status, attempt, :now FROM moved
    ), ended AS (
        UPDATE run_attempts SET status = moved.status, finished_at = :now,
            error_code = moved.w_code, error_message = moved.w_message
        FROM moved
        WHERE run_attempts.run_id = moved.id AND run_attempts.number = moved.attempt
        RETURNING run_attempts.run_id
    )"""
_FINISH_SELECT = """
    SELECT moved.id, moved.id IN (SELECT run_id FROM ended) AS ended FROM moved
    """

# The batch's deliveries (``RunDeliveries.take``), inserted by the last of
# the compare-and-sets it runs: one round trip fewer than an INSERT of their
# own. A run that did not move fails the batch (``_applied``), and its
# transaction with them, so none is left for a run that did not move.
_DELIVERY_COLUMNS = {
    "id": "varchar",
    "project_id": "varchar",
    "endpoint_id": "varchar",
    "run_id": "varchar",
    "url": "text",
    "event_type": "varchar",
    "payload": "text",
    "status": "varchar",
    "attempts": "integer",
    "schedule_step": "integer",
    "next_attempt_at": "timestamptz",
    "leased_at": "timestamptz",
    "created_at": "timestamptz",
    "updated_at": "timestamptz",
}
_DELIVERED = """, delivered AS (
        INSERT INTO deliveries ({names})
        SELECT {picked}
        FROM unnest({arrays}) AS d({names})
    )""".format(
    names=", ".join(_DELIVERY_COLUMNS),
    picked=", ".join(
        f"CAST(d.{name} AS jsonb)" if name == "payload" else f"d.{name}"
        for name in _DELIVERY_COLUMNS
    ),
    arrays=", ".join(f"CAST(:d_{name} AS {kind}[])" for name, kind in _DELIVERY_COLUMNS.items()),
)
_START, _START_DELIVERING, _FINISH, _FINISH_DELIVERING = (
    sa.text(ctes + delivered + select).bindparams(_NOW)
    for ctes, select in ((_START_CTES, _START_SELECT), (_FINISH_CTES, _FINISH_SELECT))
    for delivered in ("", _DELIVERED)
)


def _delivery_arrays(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """``_DELIVERED``'s parameters: a column's values in one array."""
    if rows and set(rows[0]) != set(_DELIVERY_COLUMNS):
        raise AssertionError(f"a delivery's columns are not _DELIVERY_COLUMNS: {sorted(rows[0])}")
    return {
        f"d_{name}": [json_text(row[name]) if name == "payload" else row[name] for row in rows]
        for name in _DELIVERY_COLUMNS
    }


# Heartbeats of running attempts (QUEUED or EXECUTING, as the batch read them).
# A run whose row another transaction holds (a
# report finishing it, in a batch of its own) is skipped rather than waited
# for: its heartbeat is moot, and waiting held every other run of this batch
# locked meanwhile (docs/architecture.md, "Writes and reports").
_BEAT = sa.text(
    """
    UPDATE runs SET heartbeat_at = :now
    FROM unnest(
        CAST(:ids AS varchar[]), CAST(:froms AS varchar[]), CAST(:attempts AS integer[]),
        CAST(:steps AS integer[])
    ) AS v(id, w_status, attempt, step)
    WHERE runs.id = ANY(CAST(:ids AS varchar[])) AND runs.id = v.id
        AND runs.status = v.w_status AND runs.attempt = v.attempt AND runs.step = v.step
        AND runs.id IN (
            SELECT id FROM runs WHERE id = ANY(CAST(:ids AS varchar[]))
            ORDER BY id FOR UPDATE SKIP LOCKED
        )
    """
).bindparams(_NOW)
_BEAT_ONE = sa.text(
    """
    UPDATE runs SET heartbeat_at = :now
    WHERE id = :id AND attempt = :attempt AND step = :step
        AND status IN ('QUEUED', 'EXECUTING')
    """
).bindparams(_NOW)


_ENDPOINTS = endpoints_of_runs(
    runs.c.id == sa.any_(sa.bindparam("run_ids", type_=ARRAY(sa.String())))
)
#: PostgreSQL's first read of a batch: ``read.load_rows``'s, and each run's
#: project's endpoints (``RunDeliveries.know``).
_LOAD_WITH_ENDPOINTS = LOAD_RUNS_WITH_ATTEMPTS.add_columns(_ENDPOINTS.c.endpoints_json).select_from(
    runs.outerjoin(_ENDPOINTS, _ENDPOINTS.c.project_id == runs.c.project_id)
)


@dataclasses.dataclass(frozen=True)
class _Final:
    index: int
    run: dict[str, Any]
    event: WorkerEvent
    to: RunStatus
    code: str | None
    message: str | None


def _final(index: int, run: dict[str, Any], event: WorkerEvent) -> _Final | None:
    """The end of a plain run that ``one_by_one.apply_final`` would make, if the
    report is one a set takes; ``None`` for one that goes one by one."""
    if not (
        event.type in ("completed", "failed")
        and run["task"] != WORKFLOW_TASK
        and run["parent_id"] is None
        and run["step"] == 0
        and not event.steps
        and is_current(run, event)
        and RunStatus(run["status"]) in ACTIVE
    ):
        return None
    if event.type == "completed":
        return _Final(index, run, event, RunStatus.COMPLETED, None, None)
    error = event.error
    if error is not None and error.retryable and run["attempt"] < run["max_attempts"]:
        return None  # a retry: one by one
    code = error.code if error else "unknown_error"
    message = error.message if error else "the worker reported a failure without details"
    to = RunStatus.TIMED_OUT if code == TIMED_OUT_CODE else RunStatus.FAILED
    return _Final(index, run, event, to, code, message)


def _starts(run: dict[str, Any], event: WorkerEvent, now: dt.datetime) -> bool:
    """Whether the report starts an attempt as ``one_by_one._apply_started`` would
    (a first step, not held, not expired)."""
    return (
        event.type == "started"
        and run["status"] == RunStatus.QUEUED.value
        and run["step"] == 0
        and is_current(run, event)
        and not run["held"]
        and not expired(run, now)
    )


def _applied(
    conn: sa.Connection, statement: sa.TextClause, params: dict[str, Any]
) -> list[sa.Row[Any]]:
    """Run a compare-and-set over a set, and return its rows (the first
    column: a moved run's ID); :class:`LostRace` if a run moved."""
    rows = list(conn.execute(statement, params))
    moved = {row[0] for row in rows}
    for run_id in params["ids"]:
        if run_id not in moved:
            raise LostRace(run_id)
    return rows


def apply_in_sets(
    conn: sa.Connection,
    events: Sequence[WorkerEvent],
    one_by_one: Callable[[sa.Connection, WorkerEvent], EventAnswer],
) -> list[EventAnswer]:
    """Apply a batch of reports in this transaction, the common ones as sets
    and the rest with ``one_by_one``; their answers, in the batch's order.

    :raises LostRace: a run moved while the batch was applied (the unit is
        undone, and applied again one report at a time)
    :raises APIError: ``one_by_one`` refused a report (likewise)
    """
    now = utcnow()
    ids = sorted({event.run_id for event in events})
    if all(event.type == "heartbeat" for event in events):
        found = {
            row["id"]: dict(row)
            for row in conn.execute(SELECT_RUNS[conn.dialect.name], {"run_ids": ids}).mappings()
        }
    elif conn.dialect.name == "postgresql":
        # Whole rows, their attempts and their projects' endpoints: the
        # views that callbacks carry are made from them and what the moves
        # wrote, and their deliveries from the endpoints, with no read again.
        found = load_rows(conn, ids, _LOAD_WITH_ENDPOINTS, now=now)
    else:
        found = load_rows(conn, ids)
    started: list[tuple[int, dict[str, Any], WorkerEvent]] = []
    finals: list[_Final] = []
    beats: list[tuple[int, dict[str, Any], WorkerEvent]] = []
    rest: list[int] = []
    taken: set[str] = set()
    for index, event in enumerate(events):
        run = found.get(event.run_id)
        if run is None or event.run_id in taken:
            rest.append(index)
        elif event.type == "heartbeat":
            beats.append((index, run, event))
        elif _starts(run, event, now):
            started.append((index, run, event))
        elif (final := _final(index, run, event)) is not None:
            finals.append(final)
        else:
            rest.append(index)
        taken.add(event.run_id)
    # In run ID order, as ``one_by_one.apply_events`` takes them one by one, so
    # that batches touching the same runs tend to lock them in one order.
    # PostgreSQL does not promise a join's order: a deadlock it breaks fails
    # the unit, and the writer runs it again.
    started.sort(key=lambda item: item[1]["id"])
    finals.sort(key=lambda final: final.run["id"])

    postgresql = conn.dialect.name == "postgresql"
    moves = [(run, RunStatus.EXECUTING, _start_values(now)) for _, run, _ in started] + [
        (f.run, f.to, _final_values(f, now)) for f in finals
    ]
    attempts = _current_attempts(started, finals, now)
    if not postgresql:
        transition_all(conn, moves, now)
        _record_attempts(conn, started, finals, attempts, None)

    # On PostgreSQL the views and deliveries are made before the moves, from
    # the rows read and what the moves will set, so that the deliveries go in
    # with the moves (``_DELIVERED``); SQLite's views read the attempts written.
    answers: list[EventAnswer | None] = [None] * len(events)
    deliveries = RunDeliveries(conn, now)
    for run in found.values():
        if "endpoints_json" in run:
            deliveries.know(run["project_id"], run.pop("endpoints_json"))
    wanted = {}
    for _, run, _ in started:
        wanted[run["id"]] = (run, "run.started", deliveries.receivers(run, "run.started"))
    for f in finals:
        event_type = FINAL_EVENTS[f.to]
        wanted[f.run["id"]] = (f.run, event_type, deliveries.receivers(f.run, event_type))
    views = _views_after(
        conn,
        [move for move in moves if wanted[move[0]["id"]][2]],
        attempts,
        now,
    )
    outgoing = {
        run_id: deliveries.add(run, event_type, views[run_id], receivers)
        for run_id, (run, event_type, receivers) in wanted.items()
        if receivers
    }
    if postgresql:
        ended = _move_as_sets(conn, started, finals, now, deliveries.take())
        _record_attempts(conn, started, finals, attempts, ended)
    deliveries.write()
    for index, run, _ in started:
        effects = Effects(outgoing=outgoing.get(run["id"], []), changed=[run["id"]])
        answers[index] = EventAnswer(True, RunStatus.EXECUTING.value, True, effects)
    for f in finals:
        run_id = f.run["id"]
        effects = Effects(outgoing=outgoing.get(run_id, []), finished=[run_id], changed=[run_id])
        answers[f.index] = EventAnswer(True, f.to.value, False, effects)

    # Each heartbeat is answered from the run as this batch read it.
    _beat(conn, [(run, event) for _, run, event in beats if _alive(run, event)], now)
    for index, run, event in beats:
        answers[index] = EventAnswer(False, run["status"], _alive(run, event))

    # The rest in run ID order, as ``one_by_one.apply_events`` locks them.
    for index in sorted(rest, key=lambda i: (events[i].run_id, i)):
        answers[index] = one_by_one(conn, events[index])
    return [answer for answer in answers if answer is not None]


def _alive(run: dict[str, Any], event: WorkerEvent) -> bool:
    """A heartbeat's ``proceed``: its attempt is current and not final (as
    ``one_by_one`` answers)."""
    return is_current(run, event) and RunStatus(run["status"]) in ACTIVE


def _beat(
    conn: sa.Connection, alive: list[tuple[dict[str, Any], WorkerEvent]], now: dt.datetime
) -> None:
    """Record the heartbeats of the attempts still running, in one statement."""
    if not alive:
        return
    if conn.dialect.name == "postgresql":
        params = {
            "ids": [run["id"] for run, _ in alive],
            "froms": [run["status"] for run, _ in alive],
            "attempts": [event.attempt for _, event in alive],
            "steps": [event.step for _, event in alive],
            "now": now,
        }
        conn.execute(_BEAT, params)
    else:
        rows = [
            {"id": run["id"], "attempt": event.attempt, "step": event.step, "now": now}
            for run, event in alive
        ]
        execute_many(conn, _BEAT_ONE, rows)


def _start_values(now: dt.datetime) -> dict[str, Any]:
    """What ``one_by_one._apply_started`` sets on a run that starts."""
    return {"started_at": KeepFirst(now), "heartbeat_at": now}


def _current_attempts(
    started: list[tuple[int, dict[str, Any], WorkerEvent]],
    finals: list[_Final],
    now: dt.datetime,
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """For each moved run, what the batch writes of its current attempt: the
    row it begins (where there is none), and what it sets on a row already
    there (``_record_attempts``; the views, ``_views_after``)."""
    out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for _, run, event in started:
        begun = {
            "number": event.attempt,
            "status": RunStatus.EXECUTING.value,
            "worker_id": event.worker_id,
            "started_at": now,
            "finished_at": None,
            "error_code": None,
            "error_message": None,
        }
        out[run["id"]] = (begun, begun)
    for f in finals:
        end = {
            "status": f.to.value,
            "finished_at": now,
            "error_code": f.code,
            "error_message": f.message,
        }
        alone = {"number": f.event.attempt, "worker_id": f.event.worker_id, "started_at": now}
        out[f.run["id"]] = ({**alone, **end}, end)
    return out


def _views_after(
    conn: sa.Connection,
    moves: list[tuple[dict[str, Any], RunStatus, dict[str, Any]]],
    attempts: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    now: dt.datetime,
) -> dict[str, dict[str, Any]]:
    """The views of moved runs, from the rows the batch read and what the
    moves set: no read of the runs again. On PostgreSQL their attempts came
    with the rows, and the current one is put as the batch wrote it; SQLite's
    are read now (one statement, after the writes)."""
    rows = []
    for run, to, values in moves:
        row = {**run, "status": to.value, "updated_at": now}
        for name, value in values.items():
            if isinstance(value, KeepFirst):
                value = run[name] if run[name] is not None else value.value
            row[name] = value
        if "attempts" in run:
            number, (begun, changed) = run["attempt"], attempts[run["id"]]
            before = [a for a in run["attempts"] if a["number"] == number]
            current = {**before[-1], **changed} if before else begun
            others = [a for a in run["attempts"] if a["number"] != number]
            row["attempts"] = sorted([*others, current], key=lambda a: a["number"])
        rows.append(row)
    with_attempts(conn, rows)
    return {row["id"]: view_of_row(conn, row) for row in rows}


def _final_values(final: _Final, now: dt.datetime) -> dict[str, Any]:
    """What ``one_by_one.apply_final`` sets on a run that ends."""
    values: dict[str, Any] = {"output": final.event.output}
    if final.to != RunStatus.COMPLETED:
        values.update(error_code=final.code, error_message=final.message)
    values.update(started_at=KeepFirst(now), finished_at=now)
    return values


def _move_as_sets(
    conn: sa.Connection,
    started: list[tuple[int, dict[str, Any], WorkerEvent]],
    finals: list[_Final],
    now: dt.datetime,
    delivering: list[dict[str, Any]],
) -> set[str]:
    """The compare-and-sets of PostgreSQL: one ``UPDATE … FROM unnest`` per
    kind, with the moved runs' transitions (and the attempts begun or ended)
    in the same statement, and the last of them inserting ``delivering``
    (``_DELIVERED``); the runs whose attempt row was there to end."""
    ended: set[str] = set()
    extra = _delivery_arrays(delivering) if delivering else {}
    if started:
        _applied(
            conn,
            _START_DELIVERING if extra and not finals else _START,
            {
                **(extra if not finals else {}),
                "now": now,
                "ids": [run["id"] for _, run, _ in started],
                "froms": [run["status"] for _, run, _ in started],
                "attempts": [event.attempt for _, _, event in started],
                "workers": [event.worker_id for _, _, event in started],
            },
        )
    if finals:
        rows = _applied(
            conn,
            _FINISH_DELIVERING if extra else _FINISH,
            {
                **extra,
                "now": now,
                "ids": [f.run["id"] for f in finals],
                "froms": [f.run["status"] for f in finals],
                "attempts": [f.event.attempt for f in finals],
                "tos": [f.to.value for f in finals],
                "outputs": [json_text(f.event.output) for f in finals],
                "codes": [f.code for f in finals],
                "messages": [f.message for f in finals],
            },
        )
        ended = {row.id for row in rows if row.ended}
    # Their transitions are written (``logged``); what else follows a move
    # (a queue's slot handed on, the change counted) happens here.
    for _, run, _ in started:
        transitioned(conn, run, RunStatus.EXECUTING, now)
    for f in finals:
        transitioned(conn, f.run, f.to, now)
    return ended


def _record_attempts(
    conn: sa.Connection,
    started: list[tuple[int, dict[str, Any], WorkerEvent]],
    finals: list[_Final],
    attempts: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    ended: set[str] | None,
) -> None:
    """Attempts begun, and attempts ended (begun here if their ``started``
    report has not arrived), as ``attempts`` (``_current_attempts``) has
    them. ``ended``: the runs whose attempt the compare-and-set ended
    already (PostgreSQL's, which began the attempts of ``started`` too), or
    ``None`` (SQLite's: begun and ended here)."""
    rows = []
    if ended is None:
        rows = [{"run_id": run["id"], **attempts[run["id"]][0]} for _, run, _ in started]
        ended = _finish_attempts(conn, finals, attempts) if finals else set()
    rows += [
        {"run_id": f.run["id"], **attempts[f.run["id"]][0]}
        for f in finals
        if f.run["id"] not in ended
    ]
    if rows:
        execute_many(conn, INSERT_ATTEMPT, rows)


def _finish_attempts(
    conn: sa.Connection,
    finals: list[_Final],
    attempts: dict[str, tuple[dict[str, Any], dict[str, Any]]],
) -> set[str]:
    """The runs whose attempt was there to end (SQLite: one ``executemany``,
    and one by one only if some attempt was not there)."""
    params = [
        {"w_run_id": f.run["id"], "w_number": f.event.attempt, **attempts[f.run["id"]][1]}
        for f in finals
    ]
    if execute_many(conn, FINISH_ATTEMPT, params) == len(params):
        return {f.run["id"] for f in finals}
    return {p["w_run_id"] for p in params if conn.execute(FINISH_ATTEMPT, p).rowcount}
