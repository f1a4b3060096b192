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
  :func:`_ping_when_idle`). Writes commit in groups too (:class:`_AsyncGroupCommit`):
  a few writers, each taking every unit that queued up while it committed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

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
            self._writer = _GroupCommit(self._sync_engine)
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
            self._async_writer = _AsyncGroupCommit(self._async_engine, writers=WRITERS)
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
        with _unreachable_as_operational():
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
        with _unreachable_as_operational():
            for pause in _pauses(deadline):
                try:
                    async with self._read_slot(), _connection(async_engine) as conn:
                        if autocommit:
                            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                        return await conn.run_sync(work)
                except Exception as exc:
                    # A read changes nothing: it is always safe to run again.
                    if not _worth_retrying(exc) or pause is None:
                        raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # _pauses ends on None, which raised

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

#: How long a unit PostgreSQL failed to break a deadlock (or a serialization
#: conflict) is run again, after a short random pause each time: under heavy
#: contention one unit can lose several times in a row.
LOCK_CONFLICT_SECONDS = 10.0
#: deadlock_detected, serialization_failure
_LOCK_CONFLICTS = frozenset({"40P01", "40001"})


def _is_lock_conflict(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) in _LOCK_CONFLICTS


def _is_unreachable(exc: BaseException) -> bool:
    """The server did not answer or went away (not a unit's own error)."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


#: Seconds a unit keeps trying while the server restarts or a pooled
#: connection turns out dead, before its caller hears 503.
TRANSIENT_RETRY_SECONDS = 3.0
#: SQLSTATEs of a connection lost or refused for now: class 08 (connection
#: exceptions) and admin_shutdown, crash_shutdown, cannot_connect_now.
_TRANSIENT_STATES = ("08", "57P01", "57P02", "57P03")


def _is_transient(exc: BaseException) -> bool:
    """The unit failed for its connection, not for itself: the server went
    away, is starting up, or the pooled connection was dead or left in a bad
    state (asyncpg's client-side errors). Another try on another connection
    may well succeed."""
    if _is_unreachable(exc) or isinstance(exc, sa.exc.PendingRollbackError):
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (OSError, TimeoutError, *_ASYNCPG_CLIENT_ERRORS)):
            return True
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and state.startswith(_TRANSIENT_STATES):
            return True
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    return False


_ASYNCPG_CLIENT_ERRORS = (
    asyncpg.exceptions.InterfaceError,  # "connection is closed"
    asyncpg.exceptions.InternalClientError,  # "cannot switch to state …"
)


def _worth_retrying(exc: BaseException) -> bool:
    """Transient, and a fresh connection may well fix it: a pooled connection
    that died or was left in a bad state, a server starting up. Not a server
    that refuses or does not answer connections: that is down for now, and
    its callers hear 503 at once rather than after a budget of tries."""
    if not _is_transient(exc):
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError | TimeoutError | socket.gaierror):
            return False
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    return True


def _pauses(deadline: float) -> Iterator[float | None]:
    """The pauses between tries until ``deadline`` (backoff from 50 ms to
    1 s); the last is ``None``: no time for another try."""
    pause = 0.05
    while time.monotonic() + pause < deadline:
        yield pause
        pause = min(pause * 2, 1.0)
    yield None


@contextlib.asynccontextmanager
async def _connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection; one that failed for a transient reason is thrown
    away rather than put back (asyncpg can leave one in a state that fails
    every later use, which SQLAlchemy does not count as a disconnect)."""
    conn = await engine.connect()
    try:
        yield conn
    except BaseException as exc:
        if _is_transient(exc) and not conn.invalidated:
            with contextlib.suppress(Exception):
                await conn.invalidate()
        raise
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


@contextlib.contextmanager
def _unreachable_as_operational() -> Iterator[None]:
    """A server that cannot be reached, or a connection lost for good, is an
    ``OperationalError``, as SQLAlchemy reports most such failures: the API
    answers it with 503 and ``Retry-After``. (asyncpg raises the socket's own
    ``OSError`` when it cannot connect, and its own errors for a server that
    is starting up or a connection left in a bad state.)"""
    try:
        yield
    except sa.exc.OperationalError:
        raise
    except Exception as exc:
        if not _is_transient(exc):
            raise
        raise sa.exc.OperationalError("(reaching the database)", None, exc) from exc


#: The write lanes: an application's writes go first; workers' reports go
#: behind them, in groups of at most ``max_group // BEHIND_SHARE`` units (a
#: report unit is itself a batch of reports). While both lanes wait, their
#: groups take turns, so a write that comes in while reports commit waits for
#: one short group at most, and reports never starve.
FIRST, BEHIND = 0, 1
BEHIND_SHARE = 8


class _Lanes(Generic[U]):
    """The units waiting to be written, in two lanes; :meth:`take` gives the
    next group (not thread-safe: the caller holds its own lock)."""

    def __init__(self, max_group: int) -> None:
        self.queues: tuple[collections.deque[U], collections.deque[U]] = (
            collections.deque(),
            collections.deque(),
        )
        self.limits = (max_group, max(1, max_group // BEHIND_SHARE))
        self._last = BEHIND

    def __len__(self) -> int:
        return len(self.queues[FIRST]) + len(self.queues[BEHIND])

    def put(self, lane: int, unit: U) -> None:
        self.queues[lane].append(unit)

    def take(self) -> list[U]:
        first, behind = self.queues
        lane = FIRST if first and not (self._last == FIRST and behind) else BEHIND
        if not self.queues[lane]:
            return []
        self._last = lane
        chosen = self.queues[lane]
        return [chosen.popleft() for _ in range(min(len(chosen), self.limits[lane]))]


class _GroupCommit:
    """SQLite's one writer: a thread that runs write units in order, and commits
    the units that queued up meanwhile in one transaction.

    Each unit of a group runs in a savepoint of its own, so one that raises
    leaves nothing behind and the others still commit; every unit's future is
    settled only once the group's COMMIT is done. A group shares one BEGIN and
    one COMMIT, and a page that several of its units touch (an index's last
    page, mostly) goes to the WAL once instead of once per unit.
    """

    def __init__(self, engine: sa.Engine, *, max_group: int = 64) -> None:
        self.engine = engine
        self.max_group = max_group
        #: Transactions committed, and units run (a group is one transaction).
        self.commits = 0
        self.units = 0
        self._lanes: _Lanes[_Unit] = _Lanes(max_group)
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="db-writer", daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[[sa.Connection], T], lane: int = FIRST
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._ready:
            self._lanes.put(lane, (fn, future))
            self._ready.notify()
        return future

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._lanes and not self._stopping:
                    self._ready.wait()
                group = self._lanes.take()
            if not group:  # stopping, and everything before is written
                return
            self._commit([u for u in group if u[1].set_running_or_notify_cancel()])

    def _commit(self, group: list[_Unit]) -> None:
        outcomes: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        self.units += len(group)
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    if len(group) == 1:  # alone: no savepoint needed
                        fn, future = group[0]
                        try:
                            outcomes.append((future, fn(conn), None))
                        except BaseException as exc:
                            outcomes.append((future, None, exc))
                            raise
                    else:
                        # Straight on the driver: SQLAlchemy's own savepoints
                        # cost more than the units they wrap.
                        driver = conn.connection.dbapi_connection
                        assert driver is not None
                        for fn, future in group:
                            driver.execute("SAVEPOINT unit")
                            try:
                                result = fn(conn)
                            except BaseException as exc:
                                driver.execute("ROLLBACK TO unit")
                                driver.execute("RELEASE unit")
                                outcomes.append((future, None, exc))
                            else:
                                driver.execute("RELEASE unit")
                                outcomes.append((future, result, None))
        except BaseException as exc:
            # BEGIN or COMMIT failed (or a lone unit raised): no unit of the
            # group is in the database; each learns why.
            for _, future in group:
                if not any(o[0] is future for o in outcomes):
                    future.set_exception(exc)
            for future, _, error in outcomes:
                future.set_exception(error if error is not None else exc)
            return
        self.commits += 1
        for future, result, error in outcomes:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


_Unit = tuple[Callable[[sa.Connection], Any], "concurrent.futures.Future[Any]"]


class _AsyncGroupCommit:
    """PostgreSQL's writes: ``writers`` tasks, each running the units that
    queued up while it committed in one transaction on one pooled connection.

    A group shares one BEGIN, one COMMIT (one WAL flush), one connection
    checkout and one hop into SQLAlchemy's sync world. A group is first run
    whole, without savepoints (a savepoint costs two round trips on the wire);
    if a unit raises, the group's transaction is rolled back and each unit
    runs again in a transaction of its own, so a failing unit is undone
    alone. Every unit's caller hears back only after its COMMIT. Several
    writers keep PostgreSQL's own concurrency (and the network waits overlap).
    """

    def __init__(self, engine: AsyncEngine, *, writers: int = 8, max_group: int = 64) -> None:
        self.engine = engine
        self.max_group = max_group
        self.writers = writers
        self.commits = 0
        self.units = 0
        self._lanes: _Lanes[tuple[Callable[[sa.Connection], Any], asyncio.Future[Any]]]
        self._lanes = _Lanes(max_group)
        #: Set while the lanes hold units: idle writers wait on it.
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def submit(self, fn: Callable[[sa.Connection], T], lane: int = FIRST) -> T:
        if not self._tasks:  # made on first use, on the loop that uses them
            # Each in a context of its own: not the first caller's, whose
            # current span and log fields would otherwise be every unit's.
            self._tasks = [
                asyncio.create_task(
                    self._loop(), name=f"db-writer-{n}", context=contextvars.Context()
                )
                for n in range(self.writers)
            ]
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._lanes.put(lane, (fn, future))
        self._ready.set()
        return await future

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(self) -> None:
        while True:
            while not self._lanes:  # one loop: nothing comes between check and clear
                self._ready.clear()
                await self._ready.wait()
            group = [u for u in self._lanes.take() if not u[1].cancelled()]
            if group:
                await self._commit(group)

    async def _commit(
        self,
        group: list[tuple[Callable[[sa.Connection], Any], Any]],
        conflicts_until: float | None = None,
        pauses: Iterator[float | None] | None = None,
    ) -> None:
        self.units += len(group)

        def run_all(conn: sa.Connection) -> list[Any]:
            return [fn(conn) for fn, _ in group]

        committing = False
        try:
            async with _connection(self.engine) as conn, conn.begin():
                results = await conn.run_sync(run_all)
                committing = True  # the COMMIT follows as the block ends
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if not committing and not cancelled and _worth_retrying(exc):
                # Lost before its COMMIT (a dead pooled connection, a server
                # restarting): nothing was written, so the group runs again on
                # another connection while there is time. A COMMIT that failed
                # may or may not have landed: that is never run again.
                pauses = pauses or _pauses(time.monotonic() + TRANSIENT_RETRY_SECONDS)
                pause = next(pauses)
                if pause is not None:
                    await asyncio.sleep(pause)
                    self.units -= len(group)
                    await self._commit(group, conflicts_until, pauses)
                    return
            # One at a time only when a unit may be at fault: a server that
            # does not answer fails the whole group at once (run unit by unit,
            # each would wait out its own connect timeout).
            if len(group) == 1 and _is_lock_conflict(exc):
                # PostgreSQL broke a deadlock (or a serialization conflict)
                # by failing this transaction: it did nothing, so it runs
                # again, after a random pause that lets the other one finish.
                until = conflicts_until or time.monotonic() + LOCK_CONFLICT_SECONDS
                if time.monotonic() < until:
                    await asyncio.sleep(random.uniform(0.01, 0.2))
                    self.units -= len(group)
                    await self._commit(group, until)
                    return
            if len(group) == 1 or cancelled or _is_transient(exc):
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            # Which unit failed is not known: each runs again, alone.
            for unit in group:
                await self._commit([unit])
            return
        self.commits += 1
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)


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
