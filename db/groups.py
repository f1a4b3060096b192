"""Group commit: the units of work that queued up while a writer committed go
in one transaction (one BEGIN, one COMMIT, one WAL flush).

SQLite has one writer thread (:class:`GroupCommit`); PostgreSQL a few writer
tasks on pooled connections (:class:`AsyncGroupCommit`). A group in which a
unit fails is rolled back and each of its units runs again alone. Writes come
in two lanes (``FIRST``, ``BEHIND``) so an application's writes never wait
behind a long run of workers' reports (docs/architecture.md, "Writes and
reports"). ``db.engine.Database`` hands them their units.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from db.failures import (
    LOCK_CONFLICT_SECONDS,
    TRANSIENT_RETRY_SECONDS,
    is_lock_conflict,
    is_transient,
    pooled_connection,
    retry_pauses,
    worth_retrying,
)

__all__ = ["BEHIND", "BEHIND_SHARE", "FIRST", "AsyncGroupCommit", "GroupCommit"]

T = TypeVar("T")
U = TypeVar("U")

#: The write lanes: an application's writes go first; workers' reports go
#: behind them, in groups of at most ``max_group // BEHIND_SHARE`` units (a
#: report unit is itself a batch of reports). While both lanes wait, their
#: groups take turns, so a write that comes in while reports commit waits for
#: one short group at most, and reports never starve.
FIRST, BEHIND = 0, 1
BEHIND_SHARE = 8


class Lanes(Generic[U]):
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


class GroupCommit:
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
        self._lanes: Lanes[_Unit] = Lanes(max_group)
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


class AsyncGroupCommit:
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
        self._lanes: Lanes[tuple[Callable[[sa.Connection], Any], asyncio.Future[Any]]]
        self._lanes = Lanes(max_group)
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
            async with pooled_connection(self.engine) as conn, conn.begin():
                results = await conn.run_sync(run_all)
                committing = True  # the COMMIT follows as the block ends
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if not committing and not cancelled and worth_retrying(exc):
                # Lost before its COMMIT (a dead pooled connection, a server
                # restarting): nothing was written, so the group runs again on
                # another connection while there is time. A COMMIT that failed
                # may or may not have landed: that is never run again.
                pauses = pauses or retry_pauses(time.monotonic() + TRANSIENT_RETRY_SECONDS)
                pause = next(pauses)
                if pause is not None:
                    await asyncio.sleep(pause)
                    self.units -= len(group)
                    await self._commit(group, conflicts_until, pauses)
                    return
            # One at a time only when a unit may be at fault: a server that
            # does not answer fails the whole group at once (run unit by unit,
            # each would wait out its own connect timeout).
            if len(group) == 1 and is_lock_conflict(exc):
                # PostgreSQL broke a deadlock (or a serialization conflict)
                # by failing this transaction: it did nothing, so it runs
                # again, after a random pause that lets the other one finish.
                until = conflicts_until or time.monotonic() + LOCK_CONFLICT_SECONDS
                if time.monotonic() < until:
                    await asyncio.sleep(random.uniform(0.01, 0.2))
                    self.units -= len(group)
                    await self._commit(group, until)
                    return
            if len(group) == 1 or cancelled or is_transient(exc):
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
