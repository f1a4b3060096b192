"""The schema, the models and the small pieces under them."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import itertools
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import db.models
from db.engine import POOL_SIZE, READ_CONNECTIONS, Database
from db.groups import BEHIND_SHARE
from db.ids import new_id
from db.models import FINAL_STATUSES, RunStatus
from db.statistics import analyze_grown
from tests.conftest import Databases, _admin


def test_migrations_create_exactly_the_models(database_url: str) -> None:
    """The migrations at head and the SQLModel tables do not differ."""

    def compare(conn: sa.Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, SQLModel.metadata))

    async def diff() -> list[object]:
        database = Database(database_url)
        try:
            return await database.read(compare)
        finally:
            await database.dispose()

    assert asyncio.run(diff()) == []


_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


def test_units_are_written_in_no_callers_context(database_url: str) -> None:
    """A writer does not keep the context of the call that started it: its
    current span and log fields would be every later unit's (a child run's
    trace joined an unrelated run's on PostgreSQL)."""

    def unit(conn: sa.Connection) -> str | None:
        return _CALLER.get()

    async def write() -> list[str | None]:
        database = Database(database_url)
        try:
            _CALLER.set("the first caller")
            first = await database.write(unit)
            later = await asyncio.create_task(database.write(unit), context=contextvars.Context())
            return [first, later]
        finally:
            await database.dispose()

    assert asyncio.run(write()) == [None, None]


def test_is_final_holds_for_exactly_the_five_final_statuses() -> None:
    final = {s for s in RunStatus if s.is_final}
    assert final == set(FINAL_STATUSES)
    assert {s.value for s in final} == {"COMPLETED", "FAILED", "CANCELED", "EXPIRED", "TIMED_OUT"}


def test_ids_are_prefixed_unique_and_sort_by_time() -> None:
    ids = [new_id("run") for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(i.startswith("run_") and len(i) == 30 for i in ids)
    # Within one millisecond the order is random; across milliseconds it is time order.
    first = new_id("run")
    import time

    time.sleep(0.002)
    assert new_id("run") > first


def test_utc_datetimes_round_trip_aware(database_url: str) -> None:
    from db.models import Project

    projects = Project.__table__  # type: ignore[attr-defined]
    stamp = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    project_id = new_id("proj")

    async def round_trip() -> dt.datetime:
        database = Database(database_url)
        try:
            await database.write(
                lambda conn: conn.execute(
                    projects.insert(),
                    {"id": project_id, "name": f"tz-{project_id}", "created_at": stamp},
                )
            )
            value = await database.read(
                lambda conn: conn.scalar(
                    sa.select(projects.c.created_at).where(projects.c.id == project_id)
                )
            )
            assert isinstance(value, dt.datetime)
            return value
        finally:
            await database.dispose()

    value = asyncio.run(round_trip())
    assert value == dt.datetime(2026, 1, 2, 1, 4, 5, 678000, tzinfo=dt.UTC)
    assert value.utcoffset() == dt.timedelta(0)


def test_naive_datetimes_are_refused() -> None:
    from db.types import UTCDateTime

    with pytest.raises(ValueError, match="naive"):
        UTCDateTime().process_bind_param(dt.datetime(2026, 1, 1), None)  # type: ignore[arg-type]


def test_sqlite_writes_commit_in_groups_and_a_failing_unit_leaves_nothing(
    tmp_path: pytest.TempPathFactory,
) -> None:
    """Units that queue up while one commits go in one transaction, each in a
    savepoint: one that raises is undone alone, the others commit."""

    def unit(conn: sa.Connection, n: int) -> int:
        conn.exec_driver_sql(f"INSERT INTO t VALUES ({n})")
        if n % 3 == 0:
            raise ValueError(n)
        return n

    async def main() -> tuple[list[object], list[int], tuple[int, int]]:
        db = Database(f"sqlite+aiosqlite:///{tmp_path}/groups.db")
        try:
            await db.write(lambda c: c.exec_driver_sql("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
            results = await asyncio.gather(
                *(db.write(unit, n) for n in range(200)), return_exceptions=True
            )
            kept = await db.read(
                lambda c: [r[0] for r in c.exec_driver_sql("SELECT n FROM t ORDER BY n")]
            )
            writer = db._writer
            return results, kept, (writer.commits, writer.units)
        finally:
            await db.dispose()

    results, kept, (commits, units) = asyncio.run(main())
    assert kept == [n for n in range(200) if n % 3]
    for n, result in enumerate(results):
        if n % 3:
            assert result == n
        else:
            assert isinstance(result, ValueError) and result.args == (n,)
    assert units == 201 and commits < units  # some units shared a transaction


#: A group of reports, at most (``db.engine``: a full group is 64 units).
BEHIND_SHARE_UNITS = 64 // BEHIND_SHARE


def test_writes_behind_yield_to_the_applications_and_none_waits_for_company(
    database_url: str,
) -> None:
    """Workers' reports go in the lane behind (``Database.write_behind``): a
    write of the application's queued after 200 of them runs within the first
    short group, and a lone write in either lane commits at once, with no
    other to wake the writer."""
    table = f"lanes_{new_id('t')[-8:]}"
    ran: list[str] = []
    ahead: list[int] = []  # how many units had run when the trigger was queued

    def unit(conn: sa.Connection, name: str) -> str:
        ran.append(name)
        conn.exec_driver_sql(f"INSERT INTO {table} VALUES ('{name}')")
        return name

    async def main() -> int:
        db = Database(database_url)
        try:
            await db.write(lambda c: c.exec_driver_sql(f"CREATE TABLE {table} (n TEXT)"))
            for n in range(20):  # alone, then in twos and threes: none waits for more
                await asyncio.wait_for(db.write(unit, f"alone{n}"), 10)
                await asyncio.wait_for(db.write_behind(unit, f"alone-behind{n}"), 10)
                await asyncio.wait_for(
                    asyncio.gather(
                        db.write_behind(unit, f"pair{n}a"), db.write_behind(unit, f"pair{n}b")
                    ),
                    10,
                )
                await asyncio.wait_for(
                    asyncio.gather(*(db.write(unit, f"three{n}{x}") for x in "abc")), 10
                )
            ran.clear()
            behind = [
                asyncio.ensure_future(db.write_behind(unit, f"report{n}")) for n in range(200)
            ]
            await asyncio.sleep(0)  # every report is queued now (SQLite's writer is at work)

            async def trigger() -> str:
                ahead.append(len(ran))  # the units run when it is queued, just below
                return await db.write(unit, "trigger")

            await asyncio.wait_for(asyncio.gather(*behind, trigger()), 30)
            count = await db.read(
                lambda c: c.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar()
            )
            await db.write(lambda c: c.exec_driver_sql(f"DROP TABLE {table}"))
            return int(count)
        finally:
            await db.dispose()

    assert asyncio.run(main()) == 341
    # It waited for the groups being written when it came (one short group
    # per writer: SQLite's one, PostgreSQL's eight) and at most one more, with
    # room for a thread switch between counting and queuing it: not for the
    # reports queued ahead of it.
    writers = 1 if database_url.startswith("sqlite") else 8
    assert len(ran) == 201
    assert ran.index("trigger") - ahead[0] <= BEHIND_SHARE_UNITS * (writers + 1) + 24, (
        ahead,
        ran.index("trigger"),
    )


def test_postgres_writes_commit_in_groups_and_a_failing_unit_leaves_nothing(
    databases: Databases,
) -> None:
    """The same on PostgreSQL: units that queue up share a transaction; a group
    with a failing unit is rolled back and each unit runs alone, so the failing
    one is undone alone and every other commits, once."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite's groups are checked above")
    url = databases.new("groups")

    def unit(conn: sa.Connection, n: int) -> int:
        conn.exec_driver_sql(f"INSERT INTO t VALUES ({n})")
        if n % 7 == 0:
            raise ValueError(n)
        return n

    async def main() -> tuple[list[object], list[int], tuple[int, int]]:
        db = Database(url)
        try:
            await db.write(lambda c: c.exec_driver_sql("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
            results = await asyncio.gather(
                *(db.write(unit, n) for n in range(300)), return_exceptions=True
            )
            kept = await db.read(
                lambda c: [r[0] for r in c.exec_driver_sql("SELECT n FROM t ORDER BY n")]
            )
            writer = db._async_writer
            return results, kept, (writer.commits, writer.units)
        finally:
            await db.dispose()

    results, kept, (commits, units) = asyncio.run(main())
    assert kept == [n for n in range(300) if n % 7]
    assert units > 300  # the groups with a failing unit ran again, unit by unit
    for n, result in enumerate(results):
        if n % 7:
            assert result == n
        else:
            assert isinstance(result, ValueError) and result.args == (n,)
    assert commits < 300  # some units shared a transaction


def test_postgres_latest_reads_run_each_statement_alone_but_not_behind_pgbouncer(
    databases: Databases,
) -> None:
    """``read_latest`` sends a read's statements with no transaction around
    them (no BEGIN and ROLLBACK round trips): each statement is a
    transaction of its own. ``read`` keeps one transaction, and so does
    ``read_latest`` with ``pgbouncer=true``, where a statement outside a
    transaction could be prepared on one server connection and run on another.
    A write after them still runs in its transaction."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite reads in a transaction of its own thread")
    url = databases.new("latest_reads")

    def alone(conn: sa.Connection) -> bool:
        # now() is the start of the statement's transaction.
        first = conn.exec_driver_sql("SELECT now() FROM pg_sleep(0.02)").scalar_one()
        second = conn.exec_driver_sql("SELECT now()").scalar_one()
        return bool(second > first)

    async def main(database_url: str) -> tuple[bool, bool, bool]:
        db = Database(database_url)
        try:
            latest, kept = await db.read_latest(alone), await db.read(alone)
            written = await db.write(alone)
            return latest, kept, written
        finally:
            await db.dispose()

    assert asyncio.run(main(url)) == (True, False, False)
    bouncer = str(sa.make_url(url).update_query_dict({"pgbouncer": "true"}))
    assert asyncio.run(main(bouncer)) == (False, False, False)


def test_postgres_reads_beyond_their_share_wait_for_a_kept_connection(
    databases: Databases,
) -> None:
    """Many reads at once (long-polls waking together) hold at most
    ``READ_CONNECTIONS`` connections, each answered; writes meanwhile still
    commit, and the pool never opens a connection beyond the ones it keeps."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite reads on a few threads of its own")
    url = databases.new("read_slots")

    async def main() -> tuple[list[int], int, int, list[int]]:
        db = Database(url)
        inside = 0
        most = 0

        def read(conn: sa.Connection, n: int) -> int:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            try:
                return int(conn.exec_driver_sql(f"SELECT {n} FROM pg_sleep(0.02)").scalar_one())
            finally:
                inside -= 1

        try:
            await db.write(lambda c: c.exec_driver_sql("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
            engine = db._async_engine
            assert engine is not None
            opened = 0

            def count(*_: object) -> None:
                nonlocal opened
                opened += 1

            sa.event.listen(engine.sync_engine, "connect", count)
            answers = await asyncio.gather(
                *(db.read(read, n) for n in range(80)),
                *(
                    db.write(lambda c, n=n: c.exec_driver_sql(f"INSERT INTO t VALUES ({n})"))
                    for n in range(40)
                ),
            )
            kept = await db.read(lambda c: [r[0] for r in c.exec_driver_sql("SELECT n FROM t")])
            return [a for a in answers[:80]], most, opened, sorted(kept)
        finally:
            await db.dispose()

    answers, most, opened, kept = asyncio.run(main())
    assert answers == list(range(80))
    assert most == READ_CONNECTIONS
    assert kept == list(range(40))
    assert opened <= POOL_SIZE


def test_postgres_units_that_deadlock_over_and_over_all_commit_once(
    databases: Databases,
) -> None:
    """Units that lock the same rows in opposite orders, many at once: PostgreSQL
    breaks each deadlock by failing one transaction, and the writer runs that
    unit again (after a short random pause) until it commits, so no caller
    sees a deadlock and every unit counts once."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has one writer and no deadlocks")
    url = databases.new("deadlocks")

    orders = list(itertools.permutations(range(1, 5), 3))

    def unit(conn: sa.Connection, n: int) -> int:
        # Deadlocks found fast, so that many happen (the default waits 1 s).
        conn.exec_driver_sql("SET LOCAL deadlock_timeout = '10ms'")
        for row in orders[n % len(orders)]:
            conn.exec_driver_sql(f"UPDATE t SET hits = hits + 1 WHERE n = {row}")
            conn.exec_driver_sql("SELECT pg_sleep(0.01)")  # each holds what it locked
        return n

    async def main() -> tuple[list[object], list[int]]:
        db = Database(url)
        try:
            await db.write(
                lambda c: c.exec_driver_sql(
                    "CREATE TABLE t (n INTEGER PRIMARY KEY, hits INTEGER NOT NULL)"
                )
            )
            await db.write(
                lambda c: c.exec_driver_sql("INSERT INTO t VALUES (1, 0), (2, 0), (3, 0), (4, 0)")
            )
            results = await asyncio.gather(
                *(db.write(unit, n) for n in range(96)), return_exceptions=True
            )
            hits = await db.read(
                lambda c: [r[0] for r in c.exec_driver_sql("SELECT hits FROM t ORDER BY n")]
            )
            return results, hits
        finally:
            await db.dispose()

    results, hits = asyncio.run(main())
    assert results == list(range(96)), [r for r in results if not isinstance(r, int)][:3]
    # Each unit updated three of the four rows, once: 96 * 3 updates in all.
    assert sum(hits) == 96 * 3 and hits == [72, 72, 72, 72]


def test_postgres_connections_lost_while_idle_cost_no_request(databases: Databases) -> None:
    """Server-side ends of the pooled connections killed, as a restart would:
    a connection idle past the threshold is pinged and replaced before use; one
    in steady use fails, is thrown away, and its unit runs again on a fresh one:
    no request sees the loss, read or write."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no server to lose")
    url = databases.new("idle_ping")
    name = sa.make_url(url).database
    kill = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )

    def one(conn: sa.Connection) -> int:
        return int(conn.execute(sa.text("SELECT 1")).scalar_one())

    async def main() -> None:
        db = Database(url, idle_ping=1.0)
        try:
            assert await db.read(one) == 1  # the pool now holds a connection
            await _admin(url, kill)
            await asyncio.sleep(1.2)  # the idle time is the condition under test
            assert await db.read(one) == 1  # pinged, found dead, replaced: no error

            await _admin(url, kill)  # now lost while in steady use
            assert await db.read(one) == 1  # dropped, and the read ran again
            assert await db.write(one) == 1
            await _admin(url, kill)
            assert await db.write(one) == 1  # a write lost before its COMMIT too
        finally:
            await db.dispose()

    asyncio.run(main())


def test_postgres_tables_grown_past_their_statistics_are_analyzed_and_replanned(
    databases: Databases,
) -> None:
    """A plan made while a table was empty reads it whole, and PostgreSQL
    keeps it until the table's statistics change: ``analyze_grown`` analyzes
    a table that has grown to twice the size they say, and the same prepared
    statement then goes through the index. A table that did not grow again
    is left alone."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no cached generic plans")
    url = databases.new("statistics")
    projects = db.models.Project.__table__  # type: ignore[attr-defined]

    def add(count: int) -> Any:
        now = dt.datetime.now(dt.UTC)
        rows = [{"id": (i := new_id("proj")), "name": i, "created_at": now} for _ in range(count)]
        return lambda conn: conn.execute(projects.insert(), rows)

    async def main() -> None:
        database = Database(url)
        engine = create_async_engine(url)
        try:
            async with engine.connect() as session:
                # Each statement its own transaction, as the pool's reads run.
                watcher = await session.execution_options(isolation_level="AUTOCOMMIT")
                await watcher.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
                await watcher.exec_driver_sql(
                    "PREPARE by_id(varchar[]) AS SELECT id FROM projects WHERE id = ANY($1)"
                )

                async def plan() -> str:
                    rows = await watcher.exec_driver_sql("EXPLAIN EXECUTE by_id(ARRAY['x'])")
                    return " ".join(str(row[0]) for row in rows)

                assert "Seq Scan" in await plan()  # planned while empty
                await database.write(add(5000))
                assert "Seq Scan" in await plan()  # and kept as the table grew
                assert await database.maintain(analyze_grown, 8) == ["projects"]
                assert "Index" in await plan()
                assert await database.maintain(analyze_grown, 8) == []
                await database.write(add(10000))
                assert await database.maintain(analyze_grown, 8) == ["projects"]
        finally:
            await engine.dispose()
            await database.dispose()

    asyncio.run(main())


def test_postgres_the_schedulers_probe_reads_no_runs_table_whole(databases: Databases) -> None:
    """The reconciler's probe for runs to release or expire (``anything_due``)
    goes through the partial indexes of runs with a time, even as the generic
    plan of a prepared statement: it reads no runs table whole, however many
    runs it holds, and still finds a run whose TTL ran out."""
    if databases.backend != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no cached generic plans")
    from gateway.background.reconciler import anything_due

    url = databases.new("due_probe")
    now = dt.datetime.now(dt.UTC)

    async def main() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(
                    "INSERT INTO projects (id, name, created_at) VALUES ('proj_due', 'due', now())"
                )
                await conn.exec_driver_sql(
                    "INSERT INTO runs (id, project_id, task, status, attempt, tags, metadata,"
                    " created_at, updated_at) SELECT 'run_due_' || g, 'proj_due', 'echo',"
                    " CASE WHEN g % 10 = 0 THEN 'QUEUED' ELSE 'COMPLETED' END, 1, '[]', '{}',"
                    " now(), now() FROM generate_series(1, 20000) g"
                )
                await conn.exec_driver_sql("ANALYZE runs")

            async def probe() -> tuple[bool, int]:
                async with engine.begin() as conn:
                    await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
                    due = await conn.run_sync(lambda sync: anything_due(sync, now))
                    scans = await conn.scalar(
                        sa.text(
                            "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'runs'"
                        )
                    )
                    return due, scans

            assert await probe() == (False, 0)
            async with engine.begin() as conn:
                await conn.exec_driver_sql(
                    "UPDATE runs SET expire_at = now() - interval '1 minute'"
                    " WHERE id = 'run_due_10'"
                )
            assert await probe() == (True, 0)
        finally:
            await engine.dispose()

    asyncio.run(main())
