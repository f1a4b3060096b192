"""A trigger's writes: on PostgreSQL a new run and its first transition go in
one statement (a data-modifying CTE, ``gateway.runs.runs_table.insert_run``),
and write exactly what the two INSERTs write, which SQLite runs. Twin runs of
each kind in one real database, one written each way, every row compared."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from db.ids import new_id
from db.types import utcnow
from gateway.runs.create import new_run
from gateway.runs.requests import TriggerOptions
from gateway.runs.runs_table import _insert_run_then_log, insert_run, run_transitions, runs
from tests.conftest import Databases
from tests.test_event_sets import _call, _counted, _rows, _seed_project

#: Each kind of new run: its options, as a trigger gives them.
KINDS: dict[str, dict[str, Any]] = {
    "plain": {},
    "tagged, with metadata and a queue": {
        "tags": ["a", "b"],
        "metadata": {"n": 12345678901234567890, "s": "é"},
        "queue": "q",
        "concurrency_key": "k",
        "priority": 5,
    },
    "delayed, with a TTL and retries": {
        "delay": "10m",
        "ttl": "1h",
        "max_attempts": 4,
        "idempotency_key": "key-1",
    },
}


def test_a_new_run_in_one_statement_writes_what_two_inserts_write(
    databases: Databases,
) -> None:
    url = databases.new("trigger_writes")
    project_id = new_id("proj")
    now = utcnow()
    twins = {
        kind: tuple(
            new_run(
                project_id,
                "echo",
                {"kind": kind},
                TriggerOptions.model_validate(options),
                now=now,
                callback_url=None,
            ).row
            for _ in range(2)
        )
        for kind, options in KINDS.items()
    }
    for first, second in twins.values():
        second.update({k: v for k, v in first.items() if k not in ("id", "idempotency_key")})
        for row in (first, second):
            row.setdefault("queue", row["task"])
            row.setdefault("priority", 0)
            row.setdefault("order_at", row["created_at"] - dt.timedelta(seconds=row["priority"]))
    statements = [0, 0]

    def seed(conn: sa.Connection) -> None:
        _seed_project(conn, project_id, now)

    def write(which: int) -> Any:
        def unit(conn: sa.Connection) -> None:
            for pair in twins.values():
                if which == 0:
                    insert_run(conn, pair[0])
                else:
                    _insert_run_then_log(conn, pair[1])

        return _counted(statements, which, unit)

    _call(url, lambda db: db.write(seed))
    _call(url, lambda db: db.write(write(0)))
    _call(url, lambda db: db.write(write(1)))
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    # One statement a run on PostgreSQL; SQLite takes the two INSERTs.
    assert statements == ([len(KINDS), 2 * len(KINDS)] if dialect == "postgresql" else [6, 6])

    tables = {"runs": (runs, runs.c.id), "transitions": (run_transitions, run_transitions.c.run_id)}
    written = [
        _rows(url, tables, [pair[which]["id"] for pair in twins.values()]) for which in (0, 1)
    ]
    for name in tables:
        assert len(written[0][name]) == len(KINDS)
        one_statement, two_inserts = (
            sorted((_plain(r, twins, which, name) for r in written[which][name]), key=repr)
            for which in (0, 1)
        )
        assert one_statement == two_inserts, name


def _plain(
    row: dict[str, Any], twins: dict[str, tuple[dict[str, Any], ...]], which: int, table: str
) -> dict[str, Any]:
    """A row as comparable across the twins: run IDs by kind, no own IDs or keys."""
    ids = {pair[which]["id"]: kind for kind, pair in twins.items()}
    return {
        k: ids.get(v, v) if isinstance(v, str) else v
        for k, v in row.items()
        if k != "idempotency_key" and not (table == "transitions" and k == "id")
    }
