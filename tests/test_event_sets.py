"""A batch of worker reports applied as sets on PostgreSQL
(``gateway.runs.event_sets``) writes exactly what the same reports write one
by one: the runs, their attempts, their transitions and their deliveries, and
the same answers. Two twin sets of runs in one real database get the same
reports, one set through each path, and every row is compared."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from db.engine import Database
from db.ids import new_id
from db.types import utcnow
from gateway.runs.effects import EventAnswer
from gateway.runs.events import apply_events
from gateway.runs.runs_table import run_attempts, run_transitions, runs
from jobs.protocol import TIMED_OUT_CODE, WorkerEvent
from tests.conftest import Databases
from webhooks.outbox import deliveries, endpoints, projects

#: Each case: the run's columns, and the reports it gets, in the batch's order.
CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "starts": ({}, [{"type": "started"}]),
    "starts, no callback": ({"callback_url": None}, [{"type": "started"}]),
    "completes": (
        {"status": "EXECUTING", "started_at": True},
        [{"type": "completed", "output": {"n": 12345678901234567890, "s": "é"}}],
    ),
    "completes with nothing": (
        {"status": "EXECUTING", "started_at": True},
        [{"type": "completed", "output": None}],
    ),
    "completes after a failed attempt": (
        {
            "status": "EXECUTING",
            "attempt": 2,
            "max_attempts": 3,
            "error_code": "flaky",
            "error_message": "the first try failed",
        },
        [{"type": "completed", "attempt": 2, "output": [1, 2]}],
    ),
    "completes before its start report": ({}, [{"type": "completed", "output": 1}]),
    "fails": (
        {"status": "EXECUTING", "started_at": True},
        [{"type": "failed", "error": {"code": "boom", "message": "it broke"}}],
    ),
    "fails without details": ({"status": "EXECUTING"}, [{"type": "failed"}]),
    "times out": (
        {"status": "EXECUTING"},
        [{"type": "failed", "error": {"code": TIMED_OUT_CODE, "message": "too slow"}}],
    ),
    "fails for the last time": (
        {"status": "EXECUTING", "attempt": 2, "max_attempts": 2},
        [{"type": "failed", "attempt": 2, "error": {"code": "x", "message": "y"}}],
    ),
    "fails and retries": (
        {"status": "EXECUTING", "max_attempts": 3},
        [{"type": "failed", "error": {"code": "x", "message": "y", "retryable": True}}],
    ),
    "held": ({"held": True}, [{"type": "started"}]),
    "expired": ({"expire_at": -60}, [{"type": "started"}]),
    "stale": ({"status": "EXECUTING", "attempt": 2}, [{"type": "completed", "output": 1}]),
    "already final": ({"status": "COMPLETED"}, [{"type": "failed"}]),
    "started then heartbeat": ({}, [{"type": "started"}, {"type": "heartbeat"}]),
    "twice started": ({}, [{"type": "started"}, {"type": "started"}]),
    "with steps": (
        {"status": "EXECUTING"},
        [
            {
                "type": "completed",
                "output": 3,
                "steps": [
                    {"key": "a", "kind": "step", "position": 0, "status": "completed", "output": 1}
                ],
            }
        ],
    ),
    "gated": ({"status": "EXECUTING", "gated": True}, [{"type": "completed", "output": 1}]),
}


def _run_row(project_id: str, label: str, columns: dict[str, Any], now: dt.datetime) -> dict:
    row: dict[str, Any] = {
        "id": new_id("run"),
        "project_id": project_id,
        "task": "echo",
        "status": "QUEUED",
        "attempt": 1,
        "max_attempts": 1,
        "payload": {"case": label},
        "tags": [],
        "metadata": {},
        "callback_url": "http://127.0.0.1:9/callback",
        "queue": "echo",
        "created_at": now - dt.timedelta(seconds=5),
        "updated_at": now - dt.timedelta(seconds=5),
        "order_at": now - dt.timedelta(seconds=5),
        # Every row names every column a case sets: one INSERT takes the
        # columns of its first row.
        "started_at": None,
        "expire_at": None,
        "held": False,
        "gated": False,
        "error_code": None,
        "error_message": None,
    }
    for name, value in columns.items():
        if name == "started_at":
            row[name] = now - dt.timedelta(seconds=1)
        elif name == "expire_at":
            row[name] = now + dt.timedelta(seconds=value)
        else:
            row[name] = value
    return row


_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z")


def _same(rows: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    """Rows as comparable across the twins: IDs by case, times and durations
    as set or not."""

    def plain(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            return "<time>"
        if isinstance(value, str):
            value = _ISO_TIME.sub("<time>", value)
            for run_id, label in names.items():
                value = value.replace(run_id, label)
            return value
        if isinstance(value, dict):
            return {
                k: "<ms>" if k == "duration_ms" and v is not None else plain(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return sorted(({k: plain(v) for k, v in row.items() if k != "id"} for row in rows), key=repr)


def test_a_batch_applied_as_sets_writes_what_one_by_one_writes(databases: Databases) -> None:
    if databases.backend != "postgresql":
        pytest.skip("the sets are PostgreSQL's; SQLite applies reports one by one")
    url = databases.new("event_sets")
    project_id = new_id("proj")
    now = utcnow()
    twins: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        label: (
            _run_row(project_id, label, columns, now),
            _run_row(project_id, label, columns, now),
        )
        for label, (columns, _) in CASES.items()
    }

    def seed(conn: sa.Connection) -> None:
        conn.execute(
            projects.insert(),
            {
                "id": project_id,
                "name": project_id,
                "signing_secret": "whsec_" + "A" * 32,
                "created_at": now,
            },
        )
        conn.execute(
            endpoints.insert(),
            {
                "id": new_id("ep"),
                "project_id": project_id,
                "url": "http://127.0.0.1:9/all",
                "description": "",
                "events": ["*", "run.started"],
                "tasks": [],
                "enabled": True,
                "created_at": now,
                "updated_at": now,
            },
        )
        conn.execute(runs.insert(), [row for pair in twins.values() for row in pair])

    def batch(which: int) -> list[WorkerEvent]:
        return [
            WorkerEvent.model_validate(
                {"run_id": twins[label][which]["id"], "attempt": 1, "worker_id": "w", **report}
            )
            for label, (_, reports) in CASES.items()
            for report in reports
        ]

    statements = [0, 0]

    def apply(which: int, isolated: bool) -> Callable[[sa.Connection], list[Any]]:
        def unit(conn: sa.Connection) -> list[Any]:
            def count(*_: Any) -> None:
                statements[which] += 1

            sa.event.listen(conn, "before_cursor_execute", count)
            try:
                return apply_events(conn, batch(which), isolated=isolated)
            finally:
                sa.event.remove(conn, "before_cursor_execute", count)

        return unit

    def read(which: int) -> dict[str, list[dict[str, Any]]]:
        ids = [pair[which]["id"] for pair in twins.values()]

        def rows(conn: sa.Connection, table: sa.Table, column: sa.Column) -> list[dict]:
            found = conn.execute(sa.select(table).where(column.in_(ids))).mappings()
            return [dict(row) for row in found]

        def all_of(conn: sa.Connection) -> dict[str, list[dict[str, Any]]]:
            return {
                "runs": rows(conn, runs, runs.c.id),
                "attempts": rows(conn, run_attempts, run_attempts.c.run_id),
                "transitions": rows(conn, run_transitions, run_transitions.c.run_id),
                "deliveries": rows(conn, deliveries, deliveries.c.run_id),
            }

        return database_call(lambda db: db.read(all_of))

    def database_call(fn: Callable[[Database], Any]) -> Any:
        async def main() -> Any:
            database = Database(url)
            try:
                return await fn(database)
            finally:
                await database.dispose()

        return asyncio.run(main())

    database_call(lambda db: db.write(seed))
    as_sets: list[EventAnswer] = database_call(lambda db: db.write(apply(0, False)))
    one_by_one: list[EventAnswer] = database_call(lambda db: db.write(apply(1, True)))

    def answers(got: list[EventAnswer]) -> list[tuple[Any, ...]]:
        return [
            (a.applied, a.status, a.proceed, sorted(o.event_type or "" for o in a.effects.outgoing))
            for a in got
        ]

    assert answers(as_sets) == answers(one_by_one)
    assert sum(len(a.effects.outgoing) for a in as_sets) >= 15
    # The sets took far fewer round trips (savepoints aside: two per report).
    assert statements[0] < (statements[1] - 2 * len(batch(1))) / 2, statements
    labels = [{pair[i]["id"]: label for label, pair in twins.items()} for i in (0, 1)]
    got = [read(0), read(1)]
    for table in ("runs", "attempts", "transitions", "deliveries"):
        assert _same(got[0][table], labels[0]) == _same(got[1][table], labels[1]), table
