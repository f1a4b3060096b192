"""The database handle: each transaction is one plain function run in one go.

A unit of work is a synchronous function ``fn(conn, *args)`` that takes a
SQLAlchemy :class:`~sqlalchemy.Connection`; :meth:`Database.write` and
:meth:`Database.read` run it in a transaction of its own and return its result.
Keeping a transaction inside one call makes it short by construction, and it
lets each backend run it the fastest way it can:

- **SQLite**: on the standard ``sqlite3`` driver in a thread. Writes go through a
  single writer thread (SQLite allows one writer at a time anyway) and begin
  ``IMMEDIATE``; reads use a small pool of threads and never wait for writes
  (WAL). One thread hop per transaction instead of one per statement, which
  made a trigger's write about three times cheaper than over aiosqlite.
- **PostgreSQL**: on asyncpg, through ``AsyncConnection.run_sync``, with a pool
  of connections; one that sat idle is pinged before use (see
  :func:`_ping_when_idle`). Writes commit in groups too (:class:`AsyncGroupCommit`):
  a few writers, each taking every unit that queued up while it committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db.failures import (
    TRANSIENT_RETRY_SECONDS,
    pooled_connection,
    retry_pauses,
    unreachable_as_operational,
    worth_retrying,
)
from db.groups import BEHIND, FIRST, AsyncGroupCommit, GroupCommit
from db.types import exact_loads, json_text

__all__ = ["Database", "postgres_connection", "savepoint"]

P = ParamSpec("P")
T = TypeVar("T")
U = TypeVar("U")

Work = Callable[Concatenate[sa.Connection, P], T]


def _sync_sqlite_url(url: str) -> str:
    parsed = sa.make_url(url)
    return parsed.set(drivername="sqlite").render_as_string(hide_password=False)


_TRUE = ("1", "true", "yes", "on")


def postgres_connection(url: str) -> tuple[sa.URL, dict[str, Any]]:
    """The URL asyncpg is given and its ``connect_args``, from a
    ``DATABASE_URL`` as platforms hand them out:

    - libpq's ``sslmode=`` (``require``, ``verify-ca``, ``verify-full``, …)
      becomes asyncpg's ``ssl`` (which takes the same names), and libpq's
      ``sslrootcert=`` (a CA of your own) a TLS context that trusts it, so
      ``?sslmode=verify-full&sslrootcert=ca.pem`` works as it does with psql;
    - ``pgbouncer=true`` (Prisma's flag) is for PgBouncer in transaction
      pooling: consecutive transactions may run on different server
      connections, so no statement is prepared for later (asyncpg's and
      SQLAlchemy's statement caches off) and each one prepared for a single
      execution gets a name of its own (two clients' ``__asyncpg_stmt_1__``
      would meet on one server connection otherwise).
    """
    made = sa.make_url(url)
    query = dict(made.query)
    connect_args: dict[str, Any] = {}
    sslmode = str(query.pop("sslmode", "")) or None
    sslrootcert = str(query.pop("sslrootcert", "")) or None
    if sslrootcert and sslmode in ("require", "verify-ca", "verify-full"):
        # As libpq: a root certificate given makes `require` check the CA too.
        context = ssl.create_default_context(cafile=sslrootcert)
        context.check_hostname = sslmode == "verify-full"
        connect_args["ssl"] = context
    elif sslmode is not None:
        connect_args["ssl"] = sslmode
    if str(query.pop("pgbouncer", "")).lower() in _TRUE:
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = _statement_name
        query["prepared_statement_cache_size"] = "0"
    return made.set(query=query), connect_args


def _statement_name() -> str:
    return f"__gw_{uuid.uuid4().hex}__"


@contextlib.contextmanager
def savepoint(conn: sa.Connection) -> Iterator[None]:
    """A savepoint inside the unit's transaction: what the block does is undone
    alone if it raises, and the exception goes on. Straight on the driver (one
    statement each way); SQLAlchemy's nested transactions cost more than most
    of the units they would wrap."""
    conn.exec_driver_sql("SAVEPOINT unit_part")
    try:
        yield
    except BaseException:
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT unit_part")
        conn.exec_driver_sql("RELEASE SAVEPOINT unit_part")
        raise
    conn.exec_driver_sql("RELEASE SAVEPOINT unit_part")


class Database:
    """One database and the two kinds of transaction the gateway uses.

    :param url: an async SQLAlchemy URL (``sqlite+aiosqlite://…`` or
        ``postgresql+asyncpg://…``)
    :param read_threads: SQLite only: threads serving read transactions
    :param idle_ping: PostgreSQL only: seconds a pooled connection may sit
        idle before it is pinged on its next use (default ``IDLE_PING_SECONDS``)
    :param pool_size: PostgreSQL only: connections kept open (default
        ``POOL_SIZE``), and ``POOL_OVERFLOW`` more for a burst
    """

    def __init__(
        self,
        url: str,
        *,
        read_threads: int = 4,
        idle_ping: float | None = None,
        pool_size: int | None = None,
    ) -> None:
        self.url = url
        self.is_sqlite = sa.make_url(url).get_backend_name() == "sqlite"
        self._async_engine: AsyncEngine | None = None
        self._sync_engine: sa.Engine | None = None
        self._reads_alone = False
        if self.is_sqlite:
            database = sa.make_url(url).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self._sync_engine = sa.create_engine(
                _sync_sqlite_url(url),
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=read_threads + 1,
                max_overflow=0,
                json_serializer=json_text,
                json_deserializer=exact_loads,
            )
            _configure_sqlite(self._sync_engine)
            self._writer = GroupCommit(self._sync_engine)
            self._readers = concurrent.futures.ThreadPoolExecutor(read_threads, "db-reader")
        else:
            engine_url, connect_args = postgres_connection(url)
            #: Behind PgBouncer in transaction pooling, a statement outside a
            #: transaction may be prepared on one server connection and run on
            #: another: every read keeps its transaction (``read_latest``).
            self._reads_alone = "prepared_statement_name_func" not in connect_args
            self._async_engine = create_async_engine(
                engine_url,
                # A server that does not take the connection in 10 s is down
                # for now (asyncpg's own default waits a minute).
                connect_args={"timeout": CONNECT_TIMEOUT, **connect_args},
                # By default enough for every writer and every read at once
                # (see READ_CONNECTIONS), so in steady use no connection is
                # opened and closed again; the overflow is for the rest (the
                # health check, the notifier's own). DATABASE_POOL_SIZE keeps
                # fewer, and units then wait their turn for one.
                pool_size=pool_size or POOL_SIZE,
                max_overflow=POOL_OVERFLOW,
                pool_recycle=1800,
                json_serializer=json_text,
                json_deserializer=exact_loads,
            )
            _ping_when_idle(
                self._async_engine.sync_engine,
                IDLE_PING_SECONDS if idle_ping is None else idle_ping,
            )
            self._async_writer = AsyncGroupCommit(self._async_engine, writers=WRITERS)
            self._read_slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    @property
    def dialect(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    async def write(self, fn: Work[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` in a write transaction, committed if it returns."""
        return await self._write(FIRST, lambda conn: fn(conn, *args, **kwargs))

    async def write_behind(self, fn: Work[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`write`, for work that can wait (workers' reports): a write of
        the other kind queued meanwhile goes first, and never commits in one
        group with these, so an application's trigger never waits behind a
        batch of reports (docs/architecture.md, "Writes and reports")."""
        return await self._write(BEHIND, lambda conn: fn(conn, *args, **kwargs))

    async def _write(self, lane: int, unit: Callable[[sa.Connection], T]) -> T:
        if self._sync_engine is not None:
            return await asyncio.wrap_future(self._writer.submit(unit, lane))
        with unreachable_as_operational():
            return await self._async_writer.submit(unit, lane)

    async def read(self, fn: Work[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` in a read transaction."""
        return await self._read(lambda conn: fn(conn, *args, **kwargs), autocommit=False)

    async def read_latest(self, fn: Work[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`read`, for ``fn`` that only reads: on PostgreSQL each of its
        statements runs alone, with no BEGIN and ROLLBACK around them (two
        round trips of a one-statement read). Each sees the latest commit,
        as it would anyway in a READ COMMITTED transaction. Long-polls and
        ``GET`` of a run read this way (docs/performance.md); behind
        PgBouncer (``pgbouncer=true``) it is :meth:`read`."""
        return await self._read(
            lambda conn: fn(conn, *args, **kwargs), autocommit=self._reads_alone
        )

    async def maintain(self, fn: Work[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` outside any unit of work, each statement
        committed as it runs (PostgreSQL: autocommit): maintenance such as
        ANALYZE, which a read's ROLLBACK would undo and a write's group
        would wait for."""
        return await self._read(lambda conn: fn(conn, *args, **kwargs), autocommit=True)

    async def _read(self, work: Callable[[sa.Connection], T], *, autocommit: bool) -> T:
        if self._sync_engine is not None:
            engine = self._sync_engine

            def run() -> T:
                with engine.connect() as conn, conn.begin():
                    return work(conn)

            return await asyncio.get_running_loop().run_in_executor(self._readers, run)
        async_engine = self._async_engine
        assert async_engine is not None
        deadline = time.monotonic() + TRANSIENT_RETRY_SECONDS
        with unreachable_as_operational():
            for pause in retry_pauses(deadline):
                try:
                    async with self._read_slot(), pooled_connection(async_engine) as conn:
                        if autocommit:
                            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                        return await conn.run_sync(work)
                except Exception as exc:
                    # A read changes nothing: it is always safe to run again.
                    if not worth_retrying(exc) or pause is None:
                        raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # pauses ends on None, which raised

    def _read_slot(self) -> asyncio.Semaphore:
        """One of ``READ_CONNECTIONS``: beyond them, a read waits its turn
        for a pooled connection instead of opening one of its own (a
        connection, its TLS offer and its prepared statements cost more than
        the wait: 64 long-polls waking together once churned the pool)."""
        loop = asyncio.get_running_loop()
        if self._read_slots is None or self._read_slots[0] is not loop:
            self._read_slots = (loop, asyncio.Semaphore(READ_CONNECTIONS))
        return self._read_slots[1]

    async def ping(self) -> None:
        await self.read(lambda conn: conn.execute(sa.text("SELECT 1")).scalar())

    async def dispose(self) -> None:
        if self._sync_engine is not None:
            self._writer.stop()
            self._readers.shutdown(wait=True)
            self._sync_engine.dispose()
        if self._async_engine is not None:
            await self._async_writer.stop()
            await self._async_engine.dispose()


#: PostgreSQL: the writers that commit groups side by side, the reads that
#: hold a connection at once, and the pool that keeps them all.
WRITERS = 8
READ_CONNECTIONS = 12
POOL_SIZE = WRITERS + READ_CONNECTIONS
#: PostgreSQL: connections opened past the pool for a burst, closed after use.
POOL_OVERFLOW = 10

#: A pooled connection unused for this long is checked before use.
IDLE_PING_SECONDS = 5.0
#: Seconds to wait for PostgreSQL to take a new connection.
CONNECT_TIMEOUT = 10.0


def _ping_when_idle(engine: sa.Engine, idle_seconds: float) -> None:
    """Check a pooled connection before use only if it sat idle a while.

    ``pool_pre_ping`` would add a round trip to every transaction (a quarter
    of a trigger's cost on PostgreSQL). A connection in steady use has just
    proved itself; one that sat idle may have outlived a server restart, and
    is pinged first. A server lost under load fails the requests in flight
    (503, ``Retry-After``), and SQLAlchemy then drops every older connection.
    """

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        last_used = record.info.get("last_used")
        if last_used is not None and time.monotonic() - last_used > idle_seconds:
            try:
                alive = engine.dialect.do_ping(dbapi_connection)
            except Exception:
                alive = False
            if not alive:
                # The pool throws this connection away and takes another.
                raise sa.exc.DisconnectionError("the connection did not answer a ping")

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["last_used"] = time.monotonic()


def _configure_sqlite(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let the "begin" hook below issue BEGIN itself (the driver's own
        # transaction handling would send a plain deferred BEGIN).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # IMMEDIATE takes the write lock up front, so two writers (in two
        # processes) queue on the busy timeout instead of one failing to
        # upgrade its read lock.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
