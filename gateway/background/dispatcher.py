"""``gateway dispatch``: callbacks sent by a process that holds the database.

With ``WEBHOOK_DISPATCHER`` on, a committed delivery's first attempt is not an
arq job: the gateway hands it over, signed, on a Redis list
(``webhooks.dispatch.handover_key``). This process takes what is handed over,
claims each in the database (a delivery is sent once, whoever finds it first),
sends it with one pooled HTTP client and records the attempt itself, with the
other attempts that ended meanwhile in one unit of work (as sets on
PostgreSQL): no job, no worker, no report back to the web process per
callback (docs/architecture.md, "Callbacks").

The database stays the record. Every ``SCHEDULER_INTERVAL`` the dispatcher
also leases what is due there and held by no one (``webhooks.dispatch.lease_due``):
retries whose time came, and attempts whose lease ran out (a dispatcher that
stopped mid-attempt, a hand-over Redis lost). On PostgreSQL several
dispatchers run side by side (the lease skips locked rows); on SQLite, one.

Every guarantee of the worker path holds: the same signatures, attempt log,
retry schedule, ``410``, auto-disable and SSRF guard (``webhooks.sender``),
and slow receivers never delay task runs (another process, other slots). At
most ``WEBHOOK_CONCURRENCY`` attempts are in flight, and at most
``WEBHOOK_RECEIVER_CONCURRENCY`` to one receiver: the rest of a slow
receiver's callbacks wait their turn while others go.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import secrets
import signal
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa
from arq import ArqRedis
from redis.exceptions import RedisError

from db.engine import Database
from db.ids import id_time
from db.types import utcnow
from gateway.errors import APIError
from gateway.settings import Settings
from jobs import heap, tracing
from jobs.deliver import send_attempt
from jobs.packing import open_pool
from jobs.protocol import REDIS_DOWN, RedisOutage, redis_settings
from jobs.worker import new_event_loop
from webhooks.dispatch import (
    DeliveryDispatcher,
    any_due,
    claim_first_attempts,
    handover_key,
    lease_due,
    release_leases,
    taken_key,
)
from webhooks.models import DeliveryAttemptReport
from webhooks.outbox import Outgoing
from webhooks.sender import callback_session
from webhooks.ssrf import parse_networks

__all__ = ["CallbackDispatcher", "run_dispatcher"]

log = logging.getLogger("gateway.dispatch")

#: Attempts taken from the hand-over list at once, at most.
TAKE = 200
#: Seconds before a callback given back (its receiver's backlog is full) is due again.
DEFER = 1.0
#: Attempts recorded in one unit of work, at most.
RECORD = 64
#: Seconds a taken mark is kept at least. Marks are dropped when their attempt
#: is recorded; one outlives that only when its dispatcher died between the
#: record and the drop, and then the row is no longer a first attempt and the
#: mark says nothing. A mark dropped sooner, while its dispatcher is dead and
#: before a scan ran (no dispatcher up for a while), would lose the
#: ``attempt_lost`` record of an attempt that went out.
MARKS_KEPT = 24 * 3600.0


class CallbackDispatcher:
    """Takes due attempts (handed over, or found due in the database), sends
    them within the concurrency limits, and records each."""

    def __init__(
        self, *, settings: Settings, db: Database, redis: ArqRedis, http: aiohttp.ClientSession
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.http = http
        self.deliveries = DeliveryDispatcher(db=db, redis=redis, settings=settings)
        self.key = handover_key(settings)
        self.slots = asyncio.Semaphore(settings.webhook_concurrency)
        self.per_receiver = settings.webhook_receiver_concurrency
        #: What is taken and not yet recorded, at most: the slots, and many
        #: more waiting their receiver's turn, so that one receiver's backlog
        #: never keeps the next receiver's callback in the list. A receiver
        #: with more than a quarter of it waiting (by count, or by the bytes
        #: of its bodies: ``WEBHOOK_DISPATCH_BUFFER_MB``) gets the rest given
        #: back, due again a second later (``DEFER``). A quarter holds a burst
        #: of one receiver's callbacks (a worker's slots ending together),
        #: which a healthy receiver takes in well under that second.
        self.limit = max(4000, 20 * settings.webhook_concurrency)
        self.wait_limit = self.limit // 4
        self.wait_bytes = int(settings.webhook_dispatch_buffer_mb * 1024 * 1024) // 4
        #: Bytes of bodies waiting, by receiver.
        self._waiting_bytes: collections.Counter[str] = collections.Counter()
        self.allowed = parse_networks(settings.webhook_allowed_networks)
        #: A hand-over younger than this is sent without a claim: its lease
        #: (``WEBHOOK_TIMEOUT`` + ``RECONCILE_GRACE`` from its creation) still
        #: holds its whole attempt and three quarters of the grace to record it.
        self.fresh_for = settings.reconcile_grace / 4
        self.taken_key = taken_key(settings)
        #: The first attempts this process took without a claim, not yet recorded.
        self._taken: set[str] = set()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[dict[str, Any]]] = {}
        self._held = 0
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Attempts that ended and wait for the recorder, with their outcome.
        self._unrecorded: list[
            tuple[DeliveryAttemptReport, asyncio.Future[dict[str, Any] | APIError]]
        ] = []
        self._recorder: asyncio.Task[None] | None = None
        self.sent = 0

    # -- taking ------------------------------------------------------------------

    async def take_handed_over(self, wait: float) -> int:
        """Take what the gateway handed over (waiting up to ``wait`` seconds
        for the first), claim it, and start it; how many were taken."""
        room = self.limit - self._held
        if room <= 0:
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), wait)
            return 0
        raw = await self.redis.lpop(self.key, min(room, TAKE))  # type: ignore[misc]
        if not raw and wait:
            popped = await self.redis.blpop([self.key], timeout=max(1, round(wait)))  # type: ignore[misc]
            raw = [popped[1]] if popped else []
        if not raw:
            return 0
        items = [orjson.loads(value) for value in raw]
        fresh: list[dict[str, Any]] = []
        stale: list[str] = []
        for item in items:
            if self._fresh(item["id"]):
                fresh.append(item)
            else:
                stale.append(item["id"])
        if fresh:  # marked before they go: a scan after a crash counts them lost
            await self.redis.zadd(self.taken_key, {item["id"]: time.time() for item in fresh})
            self._taken.update(item["id"] for item in fresh)
        claimed = await self.db.write(claim_first_attempts, stale, utcnow()) if stale else set()
        await self._start_all(fresh + [item for item in items if item["id"] in claimed])
        return len(items)

    def _fresh(self, delivery_id: str) -> bool:
        """Whether the hand-over's own lease (from the delivery's creation, the
        time in its ID) has most of its grace left: then no scan can have
        taken it, nor can take it before its attempt is recorded, and it goes
        without a claim in the database (docs/architecture.md, "Callbacks")."""
        try:
            age = time.time() - id_time(delivery_id)
        except ValueError:
            return False
        return age < self.fresh_for

    async def take_due(self) -> int:
        """Lease what is due in the database and held by no one, and start it."""
        room = self.limit - self._held
        if room <= 0:
            return 0
        now = utcnow()
        if not await self.db.read(any_due, self.deliveries.lease_seconds, now):
            return 0
        leased = await self.db.write(
            lease_due,
            self.deliveries.retry_policy(),
            self.deliveries.lease_seconds,
            now,
            room,
            await self._taken_by_anyone(),
        )
        await self._start_all(
            [self.deliveries.handed_over(item) for item in leased if isinstance(item, Outgoing)]
        )
        return len(leased)

    async def _taken_by_anyone(self) -> set[str] | None:
        """The first attempts any dispatcher took without a claim and has not
        recorded yet (``webhooks.dispatch.taken_key``); ``None`` if Redis does
        not answer. Marks older than a day (``MARKS_KEPT``) are dropped."""
        oldest = time.time() - max(MARKS_KEPT, 2 * self.deliveries.lease_seconds)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(self.taken_key, "-inf", oldest)
                pipe.zrangebyscore(self.taken_key, oldest, "+inf")
                _, members = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("reading the callbacks taken (first attempts wait): %s", exc)
            return None
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def _untake(self, ids: Sequence[str]) -> None:
        """Drop the marks of ``ids`` (recorded, or given back unsent)."""
        done = [i for i in ids if i in self._taken]
        if not done:
            return
        self._taken.difference_update(done)
        try:
            await self.redis.zrem(self.taken_key, *done)
        except (RedisError, OSError) as exc:  # the scan drops it after a day (MARKS_KEPT)
            log.warning("could not drop %d taken mark(s): %s", len(done), exc)

    # -- sending -----------------------------------------------------------------

    async def _start_all(self, items: list[dict[str, Any]]) -> None:
        deferred = [item["id"] for item in items if not self._start(item)]
        if deferred:
            due = utcnow() + dt.timedelta(seconds=DEFER)
            await self.db.write(release_leases, deferred, due)
            await self._untake(deferred)

    def _start(self, item: dict[str, Any]) -> bool:
        """Send ``item`` now, or when its receiver has a slot; ``False`` if
        its receiver has too many waiting already (the caller gives it back)."""
        receiver = item.get("receiver") or item["url"]
        if self._in_flight[receiver] >= self.per_receiver:
            waiting = self._waiting.setdefault(receiver, collections.deque())
            size = _size(item)
            # (A receiver's first waiting callback is held whatever its size.)
            if len(waiting) >= self.wait_limit or (
                waiting and self._waiting_bytes[receiver] + size > self.wait_bytes
            ):
                return False
            waiting.append(item)
            self._waiting_bytes[receiver] += size
            self._held += 1
            return True
        self._held += 1
        self._launch(receiver, item)
        return True

    def _launch(self, receiver: str, item: dict[str, Any]) -> None:
        self._in_flight[receiver] += 1
        task = asyncio.create_task(self._attempt(receiver, item), name=f"callback {item['id']}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _sent(self, receiver: str) -> None:
        """The receiver has answered (or not): its next callback may go,
        while this one's attempt is still being recorded."""
        self._in_flight[receiver] -= 1
        waiting = self._waiting.get(receiver)
        if waiting:
            item = waiting.popleft()
            self._waiting_bytes[receiver] -= _size(item)
            self._launch(receiver, item)
            if not waiting:
                del self._waiting[receiver]
                del self._waiting_bytes[receiver]
        elif not self._in_flight[receiver]:
            del self._in_flight[receiver]

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._held -= 1
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("callback %s: %s", task.get_name(), task.exception())

    async def _attempt(self, receiver: str, item: dict[str, Any]) -> None:
        delivery_id = item["id"]
        try:
            async with self.slots:
                result = await send_attempt(self.http, delivery_id, item, self.allowed)
        finally:
            self._sent(receiver)
        report = DeliveryAttemptReport(
            type="delivery.attempt",
            delivery_id=delivery_id,
            key=secrets.token_hex(16),
            trigger="schedule",
            **result.to_dict(),
        )
        # Recorded until the database takes it: the attempt went out, and its
        # lease would otherwise count it lost.
        pause = 0.1
        while True:
            try:
                outcome = await self._record(report)
                break
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                log.warning("attempt of %s not recorded yet (the database): %s", delivery_id, exc)
                await asyncio.sleep(pause)
                pause = min(5.0, pause * 2)
        if isinstance(outcome, APIError):
            log.error("attempt of %s not recorded: %s", delivery_id, outcome.message)
        self.sent += 1

    async def _record(self, report: DeliveryAttemptReport) -> dict[str, Any] | APIError:
        """Record the attempt with the others that ended meanwhile, in one
        unit of work (``DeliveryDispatcher.record_attempts``: sets on
        PostgreSQL); its outcome once that unit has committed."""
        done: asyncio.Future[dict[str, Any] | APIError] = asyncio.get_running_loop().create_future()
        self._unrecorded.append((report, done))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_all(), name="dispatch-record")
        return await done

    async def _record_all(self) -> None:
        await asyncio.sleep(0)  # the attempts that end in this turn join
        while self._unrecorded:
            batch = self._unrecorded[:RECORD]
            del self._unrecorded[:RECORD]
            try:
                outcomes = await self.deliveries.record_attempts([r for r, _ in batch])
            except Exception as exc:  # each attempt learns it, and tries again
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            await self._untake([report.delivery_id for report, _ in batch])
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                if not done.done():
                    done.set_result(outcome)

    # -- the process -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; then the attempts in flight end and are
        recorded (up to ``WORKER_SHUTDOWN_GRACE``).

        Taking stops at its next safe point, never half-way: a batch claimed
        in the database and then dropped would wait out its lease and count
        as lost attempts."""
        taker = asyncio.create_task(self._take_loop(stop), name="dispatch-handed-over")
        scanner = asyncio.create_task(self._scan_loop(stop), name="dispatch-due")
        await stop.wait()
        await asyncio.gather(taker, scanner, return_exceptions=True)
        # What waits its receiver's turn was taken and never sent: given back.
        unsent = [item["id"] for waiting in self._waiting.values() for item in waiting]
        self._waiting.clear()
        self._waiting_bytes.clear()
        if unsent:
            try:
                await self.db.write(release_leases, unsent)
                await self._untake(unsent)
            except Exception as exc:  # their leases run out: sent then, as lost first
                log.warning("could not give back %d callback(s): %s", len(unsent), exc)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.settings.worker_shutdown_grace)
        for task in self._tasks:  # past the grace: their leases run out
            task.cancel()

    async def _take_loop(self, stop: asyncio.Event) -> None:
        outage = RedisOutage("dispatcher's hand-over list")
        while not stop.is_set():  # each take waits 1 s at most for the list
            try:
                await self.take_handed_over(wait=1.0)
            except REDIS_DOWN as exc:
                await outage.wait(exc)
                continue
            except Exception:
                log.exception("taking handed-over callbacks failed; trying again")
                await asyncio.sleep(1.0)
                continue
            outage.over()

    async def _scan_loop(self, stop: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.scheduler_interval)
            if stop.is_set():
                return
            try:
                await self.take_due()
            except (RedisError, OSError) as exc:
                log.warning("looking for due callbacks: %s", exc)
            except Exception:
                log.exception("looking for due callbacks failed; trying again")


def _size(item: dict[str, Any]) -> int:
    """What a taken callback holds in memory, about: its body."""
    return len(item.get("body") or "")


async def _serve(settings: Settings, stop: asyncio.Event) -> None:
    redis_url = settings.redis_url
    if not redis_url:
        raise SystemExit("gateway dispatch: REDIS_URL is not set")
    db = Database(settings.database_url, pool_size=settings.database_pool_size)
    outage = RedisOutage("dispatcher")
    while True:
        try:
            redis = await open_pool(redis_settings(redis_url))
            break
        except REDIS_DOWN as exc:
            await outage.wait(exc)
    http = callback_session(settings.webhook_concurrency)
    dispatcher = CallbackDispatcher(settings=settings, db=db, redis=redis, http=http)
    heap.settle()
    started = time.monotonic()
    log.info(
        "dispatching callbacks from %s: %d slots, %d per receiver",
        dispatcher.key,
        settings.webhook_concurrency,
        settings.webhook_receiver_concurrency,
    )
    try:
        await dispatcher.run(stop)
    finally:
        log.info(
            "dispatcher stopped: %d attempt(s) sent in %.0f s",
            dispatcher.sent,
            time.monotonic() - started,
        )
        await http.close()
        with contextlib.suppress(Exception):
            await redis.aclose()
        await db.dispose()


def run_dispatcher(settings: Settings) -> None:
    """``gateway dispatch``: until SIGINT or SIGTERM."""
    if not settings.webhook_dispatcher:
        raise SystemExit(
            "gateway dispatch: WEBHOOK_DISPATCHER is off, so callbacks leave from the "
            "workers; set WEBHOOK_DISPATCHER=true for the gateway and this process"
        )
    tracing.setup("gateway-dispatch", settings.tracing_env())
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        loop.run_until_complete(_serve(settings, stop))
    finally:
        loop.close()
        tracing.shutdown()
