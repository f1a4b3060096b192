"""Worker reports applied as sets write exactly what the same reports write
one by one, with the same answers: run reports (``gateway.runs.reports.as_sets``:
runs, attempts, transitions, deliveries) and callback attempts
(``webhooks.deliveries.record_attempts``: deliveries and their attempts), on
both databases. Twin rows in one real database get the same reports, one
twin through each path, and every row is compared, in far fewer statements."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from db.engine import Database
from db.ids import new_id
from db.types import utcnow
from gateway.errors import NotFound
from gateway.runs.effects import EventAnswer
from gateway.runs.read import load_views
from gateway.runs.reports.one_by_one import apply_events
from gateway.runs.runs_table import run_attempts, run_transitions, runs
from jobs.protocol import TIMED_OUT_CODE, WorkerEvent
from tests.conftest import Databases
from webhooks.deliveries import RetryPolicy, delivery_attempts, record_attempt, record_attempts
from webhooks.models import DeliveryAttemptReport
from webhooks.outbox import deliveries, endpoint_secrets, endpoints, projects

SIGNING = "whsec_" + "S" * 32
BARE_SIGNING = "whsec_" + "P" * 32

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
    # ``attempt_row``: its attempt was recorded begun (its start report came).
    "completes after its start report": (
        {"status": "EXECUTING", "started_at": True, "attempt_row": True},
        [{"type": "completed", "output": 2}],
    ),
    "fails after its start report": (
        {"status": "EXECUTING", "started_at": True, "attempt_row": True},
        [{"type": "failed", "error": {"code": "boom", "message": "late"}}],
    ),
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
    "heartbeat": ({"status": "EXECUTING", "started_at": True}, [{"type": "heartbeat"}]),
    "heartbeat before its start report": ({}, [{"type": "heartbeat"}]),
    "stale heartbeat": ({"status": "EXECUTING", "attempt": 2}, [{"type": "heartbeat"}]),
    "heartbeat of a final run": ({"status": "COMPLETED"}, [{"type": "heartbeat"}]),
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
    # A project with no endpoint: its run's callback URL alone, signed with
    # the project's secret (the batch's read finds no endpoints for it).
    "completes, no endpoints": (
        {"status": "EXECUTING", "project": "bare"},
        [{"type": "completed", "output": 1}],
    ),
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
        if name in ("attempt_row", "project"):
            continue
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


def _call(url: str, fn: Callable[[Database], Any]) -> Any:
    async def main() -> Any:
        database = Database(url)
        try:
            return await fn(database)
        finally:
            await database.dispose()

    return asyncio.run(main())


def _counted(statements: list[int], which: int, fn: Callable[[sa.Connection], Any]) -> Any:
    """``fn`` as a unit of work that counts the statements it sends."""

    def unit(conn: sa.Connection) -> Any:
        def count(*_: Any) -> None:
            statements[which] += 1

        sa.event.listen(conn, "before_cursor_execute", count)
        try:
            return fn(conn)
        finally:
            sa.event.remove(conn, "before_cursor_execute", count)

    return unit


def _rows(url: str, tables: dict[str, tuple[sa.Table, sa.Column]], ids: list[str]) -> dict:
    def all_of(conn: sa.Connection) -> dict[str, list[dict[str, Any]]]:
        return {
            name: [
                dict(row)
                for row in conn.execute(sa.select(table).where(column.in_(ids))).mappings()
            ]
            for name, (table, column) in tables.items()
        }

    return _call(url, lambda db: db.read(all_of))


def _assert_twins_alike(
    rows_of: Callable[[int], tuple[dict[str, list[dict[str, Any]]], dict[str, str]]],
) -> None:
    """Twin 0's rows of each table are twin 1's, each twin's IDs read as the
    labels ``rows_of`` gives them."""
    (first, first_labels), (second, second_labels) = rows_of(0), rows_of(1)
    for name, rows in first.items():
        assert _same(rows, first_labels) == _same(second[name], second_labels), name


def _seed_project(conn: sa.Connection, project_id: str, now: dt.datetime) -> str:
    conn.execute(
        projects.insert(),
        {
            "id": project_id,
            "name": project_id,
            "signing_secret": "whsec_" + "A" * 32,
            "created_at": now,
        },
    )
    return _seed_endpoint(conn, project_id, now)


def _seed_endpoint(conn: sa.Connection, project_id: str, now: dt.datetime) -> str:
    endpoint_id = new_id("ep")
    conn.execute(
        endpoints.insert(),
        {
            "id": endpoint_id,
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
    # The one that signs now, and one that stopped (rotated away).
    conn.execute(
        endpoint_secrets.insert(),
        [
            {"endpoint_id": endpoint_id, "secret": SIGNING, "created_at": now, "expires_at": None},
            {
                "endpoint_id": endpoint_id,
                "secret": "whsec_" + "B" * 32,
                "created_at": now,
                "expires_at": now - dt.timedelta(hours=1),
            },
        ],
    )
    return endpoint_id


def _starts_only() -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The cases whose reports start runs (or beat): a batch with no run
    ending, whose deliveries go in with the start statement on PostgreSQL."""
    return {
        label: case
        for label, case in CASES.items()
        if all(report["type"] in ("started", "heartbeat") for report in case[1])
    }


@pytest.mark.parametrize("kinds", ["every kind", "starts only"])
def test_a_batch_applied_as_sets_writes_what_one_by_one_writes(
    databases: Databases, kinds: str
) -> None:
    url = databases.new("event_sets")
    cases = CASES if kinds == "every kind" else _starts_only()
    #: Deliveries (and so callback bodies) the batch makes, at the least.
    least = 15 if kinds == "every kind" else 3
    project_id, bare_id = new_id("proj"), new_id("proj")

    def owner(columns: dict[str, Any]) -> str:
        return bare_id if columns.get("project") == "bare" else project_id

    now = utcnow()
    twins: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        label: (
            _run_row(owner(columns), label, columns, now),
            _run_row(owner(columns), label, columns, now),
        )
        for label, (columns, _) in cases.items()
    }

    def seed(conn: sa.Connection) -> None:
        _seed_project(conn, project_id, now)
        conn.execute(
            projects.insert(),
            {"id": bare_id, "name": bare_id, "signing_secret": BARE_SIGNING, "created_at": now},
        )
        conn.execute(runs.insert(), [row for pair in twins.values() for row in pair])
        begun = [
            {
                "run_id": row["id"],
                "number": row["attempt"],
                "status": "EXECUTING",
                "worker_id": "w",
                "started_at": now - dt.timedelta(seconds=1),
            }
            for label, pair in twins.items()
            if cases[label][0].get("attempt_row")
            for row in pair
        ]
        if begun:
            conn.execute(run_attempts.insert(), begun)

    def batch(which: int) -> list[WorkerEvent]:
        return [
            WorkerEvent.model_validate(
                {"run_id": twins[label][which]["id"], "attempt": 1, "worker_id": "w", **report}
            )
            for label, (_, reports) in cases.items()
            for report in reports
        ]

    statements = [0, 0]
    _call(url, lambda db: db.write(seed))
    as_sets: list[EventAnswer] = _call(
        url,
        lambda db: db.write(_counted(statements, 0, lambda conn: apply_events(conn, batch(0)))),
    )
    one_by_one: list[EventAnswer] = _call(
        url,
        lambda db: db.write(
            _counted(statements, 1, lambda conn: apply_events(conn, batch(1), isolated=True))
        ),
    )

    def answers(got: list[EventAnswer]) -> list[tuple[Any, ...]]:
        return [
            (a.applied, a.status, a.proceed, sorted(o.event_type or "" for o in a.effects.outgoing))
            for a in got
        ]

    assert answers(as_sets) == answers(one_by_one)
    assert sum(len(a.effects.outgoing) for a in as_sets) >= least
    # The sets took far fewer round trips (savepoints aside: two per report).
    assert statements[0] < (statements[1] - 2 * len(batch(1))) / 2, statements
    tables = {
        "runs": (runs, runs.c.id),
        "attempts": (run_attempts, run_attempts.c.run_id),
        "transitions": (run_transitions, run_transitions.c.run_id),
        "deliveries": (deliveries, deliveries.c.run_id),
    }

    def rows_of(which: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
        labels = {pair[which]["id"]: label for label, pair in twins.items()}
        return _rows(url, tables, list(labels)), labels

    _assert_twins_alike(rows_of)

    # Each run's last callback carries the run as committed, times and all
    # (the sets make the view from what they read and wrote, one by one
    # reads it again): here times are compared, not masked.
    def sent_and_stored(conn: sa.Connection) -> list[tuple[Any, Any]]:
        last: dict[str, dict[str, Any]] = {}
        for answer in [*as_sets, *one_by_one]:
            for out in answer.effects.outgoing:
                body = json.loads(out.body)
                last[body["data"]["id"]] = body["data"]
        stored = load_views(conn, list(last))
        return [(sent, stored[run_id]) for run_id, sent in sorted(last.items())]

    pairs = _call(url, lambda db: db.read(sent_and_stored))
    assert len(pairs) >= least
    for sent, stored in pairs:
        assert sent == stored
    # Each endpoint's delivery is signed with the secret that signs now.
    signed = [
        out.secrets
        for answer in [*as_sets, *one_by_one]
        for out in answer.effects.outgoing
        if out.url.endswith("/all")
    ]
    assert len(signed) >= least
    assert set(signed) == {(SIGNING,)}
    if "completes, no endpoints" not in cases:
        return
    bare = [
        out.secrets
        for label in ("completes, no endpoints",)
        for run in twins[label]
        for answer in [*as_sets, *one_by_one]
        for out in answer.effects.outgoing
        if run["id"] in out.body
    ]
    assert bare == [(BARE_SIGNING,)] * 2


#: Each case: the delivery's columns, and the attempts reported on it.
ATTEMPT_CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "first attempt answered": ({}, [{"status_code": 200}]),
    "callback answered": ({"endpoint_id": None}, [{"status_code": 204}]),
    "retry answered": ({"attempts": 2, "schedule_step": 2}, [{"status_code": 200}]),
    "resend answered": (
        {"status": "failed", "attempts": 5, "last_error": "HTTP 500"},
        [{"status_code": 200, "trigger": "resend"}],
    ),
    "answered again": ({"status": "delivered", "attempts": 1}, [{"status_code": 200}]),
    "refused": ({}, [{"status_code": 500, "response_body": "no"}]),
    "unreachable": ({}, [{"error": "connection refused", "error_code": "connection_error"}]),
    "gone": ({}, [{"status_code": 410}]),
    "reported twice": (
        {},
        [{"status_code": 200, "key": "same"}, {"status_code": 200, "key": "same"}],
    ),
    "two attempts": ({}, [{"status_code": 503}, {"status_code": 200}]),
}


def test_callback_attempts_recorded_as_sets_write_what_one_by_one_writes(
    databases: Databases,
) -> None:
    url = databases.new("attempt_sets")
    project_id = new_id("proj")
    now = utcnow()
    policy = RetryPolicy(
        schedule=(5.0, 30.0, 60.0), jitter=0.0, retry_after_max=60.0, disable_after=3600.0
    )

    def delivery(label: str, columns: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": new_id("msg"),
            "project_id": project_id,
            "run_id": None,
            "url": "http://127.0.0.1:9/all",
            "event_type": "run.completed",
            "payload": {"case": label},
            "status": "pending",
            "attempts": 0,
            "schedule_step": 0,
            "next_attempt_at": now,
            "leased_at": now,
            "last_error": None,
            "created_at": now,
            "updated_at": now,
            **columns,
        }

    twins: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    endpoint_ids: list[str] = []

    def seed(conn: sa.Connection) -> None:
        # Each twin its own endpoint: a 410 disables the endpoint it answers for.
        first = _seed_project(conn, project_id, now)
        second = _seed_endpoint(conn, project_id, now)
        for label, (columns, _) in ATTEMPT_CASES.items():
            twins[label] = (
                delivery(label, {"endpoint_id": first, **columns}),
                delivery(label, {"endpoint_id": second, **columns}),
            )
        endpoint_ids.extend((first, second))
        conn.execute(deliveries.insert(), [row for pair in twins.values() for row in pair])

    _call(url, lambda db: db.write(seed))

    def batch(which: int) -> list[DeliveryAttemptReport]:
        reports = []
        for label, (_, attempts) in ATTEMPT_CASES.items():
            delivery_id = twins[label][which]["id"]
            for n, attempt in enumerate(attempts):
                key = attempt.get("key", str(n))
                fields = {k: v for k, v in attempt.items() if k != "key"}
                reports.append(
                    DeliveryAttemptReport.model_validate(
                        {
                            "type": "delivery.attempt",
                            "delivery_id": delivery_id,
                            "key": f"{delivery_id}:{key}",
                            "trigger": "schedule",
                            "latency_ms": 3,
                            **fields,
                        }
                    )
                )
        missing = DeliveryAttemptReport(
            type="delivery.attempt",
            delivery_id="msg_missing",
            key=f"missing-{which}",
            trigger="schedule",
            status_code=200,
        )
        return [*reports, missing]

    def one_by_one(conn: sa.Connection) -> list[Any]:
        out: list[Any] = []
        for report in batch(1):
            try:
                out.append(record_attempt(conn, policy, report, utcnow()))
            except NotFound as exc:
                out.append(exc)
        return out

    statements = [0, 0]
    as_sets = _call(
        url,
        lambda db: db.write(
            _counted(statements, 0, lambda conn: record_attempts(conn, policy, batch(0), utcnow()))
        ),
    )
    singly = _call(url, lambda db: db.write(_counted(statements, 1, one_by_one)))

    def outcomes(got: list[Any]) -> list[Any]:
        return [
            type(o).__name__
            if isinstance(o, Exception)
            else (o["recorded"], o["next_attempt_in"] is not None, o["step"])
            for o in got
        ]

    assert outcomes(as_sets) == outcomes(singly)
    # Five successes as sets: about five statements in all, against four each.
    assert statements[0] + 10 < statements[1], statements
    tables = {
        "deliveries": (deliveries, deliveries.c.id),
        "attempts": (delivery_attempts, delivery_attempts.c.delivery_id),
    }

    def rows_of(which: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
        labels = {pair[which]["id"]: label for label, pair in twins.items()}
        got = _rows(url, tables, list(labels))
        got["endpoint"] = _rows(
            url, {"endpoint": (endpoints, endpoints.c.id)}, [endpoint_ids[which]]
        )["endpoint"]
        labels[endpoint_ids[which]] = "the endpoint"
        got["attempts"] = [{k: v for k, v in row.items() if k != "key"} for row in got["attempts"]]
        return got, labels

    _assert_twins_alike(rows_of)


def test_heartbeats_skip_a_run_another_transaction_holds(databases: Databases) -> None:
    """A batch of heartbeats does not wait for a run whose row another
    transaction holds (a report finishing it): the others' heartbeats are
    recorded at once, that one's is left, and every one is answered."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has one writer, so no row is held by another")
    url = databases.new("beats_skip")
    project_id = new_id("proj")
    now = utcnow()
    rows = [
        _run_row(project_id, f"beat-{n}", {"status": "EXECUTING", "started_at": True}, now)
        for n in range(3)
    ]
    held = rows[1]["id"]

    def seed(conn: sa.Connection) -> None:
        _seed_project(conn, project_id, now)
        conn.execute(runs.insert(), rows)

    beats = [
        WorkerEvent.model_validate(
            {"run_id": row["id"], "attempt": 1, "worker_id": "w", "type": "heartbeat"}
        )
        for row in rows
    ]

    async def main(db: Database) -> tuple[list[EventAnswer], dict[str, Any]]:
        await db.write(seed)
        engine = db._async_engine
        assert engine is not None
        async with engine.connect() as holder, holder.begin():
            await holder.execute(sa.select(runs.c.id).where(runs.c.id == held).with_for_update())
            answers = await asyncio.wait_for(
                db.write(lambda conn: apply_events(conn, beats)), timeout=10
            )
        beaten = await db.read(
            lambda conn: dict(
                conn.execute(
                    sa.select(runs.c.id, runs.c.heartbeat_at).where(
                        runs.c.id.in_([row["id"] for row in rows])
                    )
                ).all()
            )
        )
        return answers, beaten

    answers, beaten = _call(url, main)
    assert [(a.applied, a.status, a.proceed) for a in answers] == [(False, "EXECUTING", True)] * 3
    assert {run_id for run_id, at in beaten.items() if at is not None} == {
        rows[0]["id"],
        rows[2]["id"],
    }


def _index_names(plan: dict[str, Any]) -> set[tuple[str, str]]:
    """Each ``(node type, index or relation)`` that reads a table in ``plan``."""
    found = set()
    if "Index Name" in plan or plan.get("Node Type") == "Seq Scan":
        found.add((plan["Node Type"], plan.get("Index Name") or plan["Relation Name"]))
    for child in plan.get("Plans", ()):
        found |= _index_names(child)
    return found


#: Each compare-and-set over a set of runs (``gateway.runs.reports.as_sets``),
#: the status its runs are in, and its parameters past ``now`` and ``ids``.
_SET_STATEMENTS: dict[str, tuple[str, Callable[[int], dict[str, list[Any]]]]] = {
    "_START": (
        "QUEUED",
        lambda n: {"froms": ["QUEUED"] * n, "attempts": [1] * n, "workers": ["w"] * n},
    ),
    "_FINISH": (
        "EXECUTING",
        lambda n: {
            "froms": ["EXECUTING"] * n,
            "attempts": [1] * n,
            "tos": ["COMPLETED"] * n,
            "outputs": ["1"] * n,
            "codes": [None] * n,
            "messages": [None] * n,
        },
    ),
    "_BEAT": (
        "EXECUTING",
        lambda n: {"froms": ["EXECUTING"] * n, "attempts": [1] * n, "steps": [0] * n},
    ),
}


@pytest.mark.parametrize("name", list(_SET_STATEMENTS))
def test_a_set_of_reports_reaches_its_runs_by_id_whatever_the_backlog(
    databases: Databases, name: str
) -> None:
    """A compare-and-set over a batch of reports reads its runs by their IDs,
    not through a status index, also when the table's statistics say that few
    runs are in that status while thousands are (a backlog that came after
    the last ANALYZE). Through the status index, each batch of ``started``
    reports read every queued run: 16 to 25 ms a batch with 8,000 queued
    (docs/performance.md)."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite's sets go one row at a time, by ID")
    from gateway.runs.reports import as_sets

    statement = getattr(as_sets, name)
    status, more = _SET_STATEMENTS[name]
    url = databases.new("set_plans")
    project_id = new_id("proj")
    now = utcnow()
    rows = [_run_row(project_id, f"backlog-{n}", {"status": "COMPLETED"}, now) for n in range(3000)]
    ids = sorted(row["id"] for row in rows)[1000:1032]

    def seed(conn: sa.Connection) -> None:
        _seed_project(conn, project_id, now)
        conn.execute(runs.insert(), rows)

    def plan(conn: sa.Connection) -> set[tuple[str, str]]:
        conn.execute(sa.text("ANALYZE runs"))  # the statistics: every run has ended
        conn.execute(sa.text("UPDATE runs SET status = :status"), {"status": status})
        explain = sa.text("EXPLAIN (FORMAT JSON) " + statement.text).bindparams(
            *statement._bindparams.values()
        )
        params = {"now": now, "ids": ids, **more(len(ids))}
        (document,) = conn.execute(explain, params).scalar_one()
        return _index_names(document["Plan"])

    async def main(db: Database) -> set[tuple[str, str]]:
        await db.write(seed)
        engine = db._async_engine
        assert engine is not None
        async with engine.connect() as conn, conn.begin() as transaction:
            read = await conn.run_sync(plan)
            await transaction.rollback()
        return read

    read = _call(url, main)
    of_runs = {(node, index) for node, index in read if index == "runs" or "runs_" in index}
    assert of_runs, read
    assert all(index == "runs_pkey" for _, index in of_runs), read
