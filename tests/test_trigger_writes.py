"""A trigger's writes: on PostgreSQL a new run and its first transition go in
one statement (a data-modifying CTE, ``gateway.runs.runs_table.insert_run``),
and write exactly what the two INSERTs write, which SQLite runs. Runs inserted
as sets (``insert_runs``, what a group of triggers takes) write what they write
one by one. Twin runs of each kind in one real database, one written each way,
every row compared. And triggers that arrive together, over HTTP, are created
together (``gateway.services.coalesce``), each its own run."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from db.ids import new_id
from db.types import utcnow
from gateway.queues.admission import admit, admitted_by_insert, insert_admitted
from gateway.queues.slots import queues
from gateway.runs.create import new_run
from gateway.runs.requests import TriggerOptions
from gateway.runs.runs_table import (
    PUMPS,
    _insert_run_then_log,
    insert_run,
    insert_runs,
    run_transitions,
    runs,
)
from tests.conftest import Databases, Stack
from tests.test_event_sets import _call, _counted, _rows, _seed_project
from tests.test_metrics import scrape, value

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
    twins = _twins(project_id, now)
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
    _assert_alike(url, twins)


def test_runs_inserted_as_sets_write_what_one_by_one_writes(databases: Databases) -> None:
    url = databases.new("trigger_sets")
    project_id = new_id("proj")
    now = utcnow()
    twins = _twins(project_id, now)
    # A second shape of row (a column fewer) goes in a statement of its own.
    for row in twins["plain"]:
        del row["debounce_until"]
    statements = [0, 0]

    def seed(conn: sa.Connection) -> None:
        _seed_project(conn, project_id, now)

    def write(which: int) -> Any:
        def unit(conn: sa.Connection) -> None:
            rows = [pair[which] for pair in twins.values()]
            if which == 0:
                for row in rows:
                    insert_run(conn, row)
            else:
                insert_runs(conn, rows)

        return _counted(statements, which, unit)

    _call(url, lambda db: db.write(seed))
    _call(url, lambda db: db.write(write(0)))
    _call(url, lambda db: db.write(write(1)))
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    # Two shapes: one executemany each on PostgreSQL, two each on SQLite.
    assert statements == ([len(KINDS), 2] if dialect == "postgresql" else [2 * len(KINDS), 4])
    _assert_alike(url, twins)


#: Queues of the admission twins: (limit, paused) of the row, or no row.
QUEUE_ROWS: dict[str, tuple[int | None, bool] | None] = {
    "no-row": None,
    "open": (None, False),
    "limited": (2, False),
    "paused": (None, True),
    "limited-and-paused": (5, True),
}


def test_runs_admitted_by_their_insert_write_what_a_read_then_an_insert_write(
    databases: Databases,
) -> None:
    """PostgreSQL: a group of triggers' runs are admitted by their INSERT
    (``insert_admitted``), joined there to their queues' rows, where the
    queue's row was read first (``admit``, then ``insert_runs``). Twin runs in
    each kind of queue, one written each way: the same rows (JSON ``null``
    told apart from SQL ``NULL``), the same transitions, the same runs to
    start, the same queues to pump, in one statement instead of a read a
    queue and an INSERT."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite reads the queue, then inserts")
    url = databases.new("trigger_admission")
    project_id = new_id("proj")
    now = utcnow()
    twins: dict[str, tuple[dict[str, Any], ...]] = {}
    for queue in QUEUE_ROWS:
        for kind, options in [("plain", {}), ("keyed, no payload", {"concurrency_key": "k"})]:
            twins[f"{queue}, {kind}"] = tuple(
                new_run(
                    project_id,
                    "echo",
                    None if kind.endswith("no payload") else {"kind": kind},
                    TriggerOptions.model_validate({**options, "queue": queue}),
                    now=now,
                    callback_url=None,
                ).row
                for _ in range(2)
            )
    statements = [0, 0]
    decided: list[tuple[set[str], set[tuple[str, str]]]] = []

    def seed(conn: sa.Connection) -> None:
        _seed_project(conn, project_id, now)
        conn.execute(
            queues.insert(),
            [
                {
                    "project_id": project_id,
                    "name": name,
                    "concurrency_limit": rule[0],
                    "paused": rule[1],
                    "created_at": now,
                    "updated_at": now,
                }
                for name, rule in QUEUE_ROWS.items()
                if rule is not None
            ],
        )

    def write(which: int) -> Any:
        def unit(conn: sa.Connection) -> None:
            rows = [pair[which] for pair in twins.values()]
            if which == 0:
                assert all(admitted_by_insert(conn, row) for row in rows)
                starting = insert_admitted(conn, rows)
            else:
                starting = {row["id"] for row in rows if admit(conn, row, {})}
                insert_runs(conn, rows)
            labels = {row["id"]: label for label, pair in twins.items() for row in pair}
            decided.append(({labels[i] for i in starting}, set(conn.info.pop(PUMPS, set()))))

        return _counted(statements, which, unit)

    _call(url, lambda db: db.write(seed))
    _call(url, lambda db: db.write(write(0)))
    _call(url, lambda db: db.write(write(1)))
    assert decided[0] == decided[1]
    starts, pumps = decided[0]
    assert starts == {
        f"{q}, {kind}" for q in ("no-row", "open") for kind in ("plain", "keyed, no payload")
    }
    assert pumps == {(project_id, q) for q in ("limited", "paused", "limited-and-paused")}
    # One statement (one shape of row), against a read of each queue and the INSERT.
    assert statements == [1, len(QUEUE_ROWS) * 2 + 1], statements
    _assert_alike(url, twins, count=len(twins))

    def as_text(conn: sa.Connection) -> list[list[tuple[Any, ...]]]:
        columns = [sa.cast(column, sa.Text) for column in runs.c if column.name != "id"]
        return [
            sorted(
                tuple(r)
                for r in conn.execute(
                    sa.select(*columns).where(
                        runs.c.id.in_([p[which]["id"] for p in twins.values()])
                    )
                )
            )
            for which in (0, 1)
        ]

    by_insert, read_first = _call(url, lambda db: db.read(as_text))
    assert by_insert == read_first
    assert any(
        "null" in row for row in by_insert
    )  # a payload of JSON null, as SQLAlchemy stores it


def _twins(project_id: str, now: dt.datetime) -> dict[str, tuple[dict[str, Any], ...]]:
    """Two rows of each kind, alike but for their IDs and keys."""
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
    return twins


def _assert_alike(
    url: str, twins: dict[str, tuple[dict[str, Any], ...]], count: int = len(KINDS)
) -> None:
    tables = {"runs": (runs, runs.c.id), "transitions": (run_transitions, run_transitions.c.run_id)}
    written = [
        _rows(url, tables, [pair[which]["id"] for pair in twins.values()]) for which in (0, 1)
    ]
    for name in tables:
        assert len(written[0][name]) == count
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


def test_triggers_that_arrive_together_are_created_together_each_its_own_run(
    stack: Stack,
) -> None:
    before = scrape(stack)
    count = 120

    async def fire() -> list[httpx.Response]:
        headers = {"authorization": f"Bearer {stack.api_key}"}
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(
            base_url=stack.base_url, headers=headers, limits=limits, timeout=30
        ) as client:
            return await asyncio.gather(
                *(
                    client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": n}})
                    for n in range(count)
                )
            )

    answers = asyncio.run(fire())
    assert [a.status_code for a in answers] == [202] * count
    ids = [a.json()["id"] for a in answers]
    assert len(set(ids)) == count
    after = scrape(stack)
    groups = value(after, "gateway_trigger_group_size_count") - value(
        before, "gateway_trigger_group_size_count"
    )
    grouped = value(after, "gateway_trigger_group_size_sum") - value(
        before, "gateway_trigger_group_size_sum"
    )
    # Every trigger went in a group (other tests' too); some groups held several.
    assert grouped >= count
    assert grouped - groups > 0
    with stack.client() as client:
        for n, run_id in enumerate(ids):
            final = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
            assert final["status"] == "COMPLETED", final
            assert final["payload"] == {"n": n}
            assert final["output"] == {"n": n}
    rows = stack.query(
        "SELECT run_id, to_status FROM run_transitions"
        " WHERE run_id IN :ids AND from_status IS NULL",
        ids=tuple(ids),
    )
    assert sorted(rows) == sorted((run_id, "QUEUED") for run_id in ids)
