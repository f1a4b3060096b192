"""The arq worker process: runs tasks (``jobs.runs.attempt``) and callback attempts
(``jobs.deliver``), each on its own queue, and reports to the gateway.

Start it with ``gateway worker`` or ``arq jobs.worker.WorkerSettings``. It needs
only ``REDIS_URL``, ``GATEWAY_URL`` and ``GATEWAY_SECRET_KEY`` (docs/architecture.md,
invariant 2): it never opens the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import logging
import os
import signal
import socket
import time
from typing import Any

import aiohttp
import httpx
from arq import ArqRedis, func
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.commands.core import AsyncScript

from jobs import heap, tracing
from jobs.contract import DeliverReport, DeliverWebhook, RunTask
from jobs.deliver import deliver_webhook
from jobs.liveness.heartbeat import Heartbeats
from jobs.liveness.presence import HealthPort, LoopTicker, presence_of
from jobs.merged import merging
from jobs.packing import open_pool
from jobs.protocol import (
    REDIS_DOWN,
    RedisOutage,
    listen_forever,
    nudge_channel,
    nudge_due,
    parse_run_job_id,
    redis_database,
    redis_settings,
)
from jobs.report import Reporter, deliver_report, gateway_session
from jobs.runs.attempt import run_task
from jobs.settings import Settings
from jobs.tasks.registry import load_tasks
from webhooks.sender import callback_session

__all__ = [
    "DeliveryWorkerSettings",
    "NudgedWorker",
    "WorkerSettings",
    "build_delivery_worker",
    "build_worker",
    "new_event_loop",
    "run_workers",
]

log = logging.getLogger("jobs.worker")

#: Seconds between two polls set for jobs announced ahead of their time.
NUDGE_SPACING = 0.01
#: Jobs ahead of their time a worker keeps track of; past that, it polls.
MAX_AHEAD = 10_000


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx.get("settings") or Settings.from_env()
    ctx["settings"] = settings
    secret = settings.require_secret()
    tracing.setup("gateway-worker", settings.tracing_env())
    ctx["registry"] = load_tasks(settings.task_modules)
    ctx["worker_id"] = _worker_id()
    ctx["gateway_http"] = gateway_session()
    ctx["reporter"] = Reporter(settings.gateway_url, secret, session=ctx["gateway_http"])
    # Only the task worker runs attempts, so only it beats (one thread per
    # process: the delivery worker beside it in `gateway worker` has none).
    if ctx.get("runs_tasks"):
        heartbeats = ctx["heartbeats"] = Heartbeats(
            settings.gateway_url,
            secret,
            interval=settings.heartbeat_interval,
            worker_id=ctx["worker_id"],
            presence=presence_of(
                ctx["worker_id"],
                queue=settings.queue_name,
                tasks=ctx["registry"].names(),
                slots=settings.worker_concurrency,
            ),
        )
        heartbeats.start()
        if settings.worker_health_port is not None:
            ctx["health"] = _health_port(settings, ctx["worker_id"], heartbeats)
    # Callbacks go to strangers: no proxies from the environment, no redirects,
    # and a pool of its own so a slow receiver never holds up reports.
    ctx["webhook_http"] = httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
    )
    # Callbacks, when workers send them (WEBHOOK_DISPATCHER=false): the same
    # pool `gateway dispatch` sends through.
    ctx["callback_http"] = callback_session(200)
    heap.settle()
    log.info(
        "worker %s reporting to %s; tasks: %s",
        ctx["worker_id"],
        settings.gateway_url,
        ", ".join(ctx["registry"].names()),
    )


def _health_port(settings: Settings, worker_id: str, heartbeats: Heartbeats) -> HealthPort:
    ticker = LoopTicker()
    ticker.start()

    def status() -> dict[str, Any]:
        answered = heartbeats.answered_at
        return {
            "worker_id": worker_id,
            "slots": settings.worker_concurrency,
            "slots_in_use": heartbeats.in_hand,
            "gateway_answered_seconds_ago": (
                None if answered is None else round(time.monotonic() - answered, 3)
            ),
        }

    assert settings.worker_health_port is not None
    health = HealthPort(
        settings.worker_health_host,
        settings.worker_health_port,
        ticker,
        stall=settings.worker_health_stall,
        status=status,
    )
    health.start()
    return health


async def shutdown(ctx: dict[str, Any]) -> None:
    health: HealthPort | None = ctx.get("health")
    if health is not None:
        await health.ticker.stop()
        await asyncio.to_thread(health.stop)
    heartbeats: Heartbeats | None = ctx.get("heartbeats")
    if heartbeats is not None:
        await asyncio.to_thread(heartbeats.stop)
    client: httpx.AsyncClient | None = ctx.get("webhook_http")
    if client is not None:
        await client.aclose()
    for name in ("gateway_http", "callback_http"):
        session: aiohttp.ClientSession | None = ctx.get(name)
        if session is not None:
            await session.close()


def _common_options(settings: Settings) -> dict[str, Any]:
    return {
        "redis_settings": redis_settings(settings.redis_url or "redis://127.0.0.1:6379"),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "poll_delay": settings.worker_poll_delay,
        "keep_result": 3600,
        # SIGTERM: take no new jobs, let running ones finish up to the grace
        # period, then cancel the rest, which arq puts back on the queue.
        "job_completion_wait": settings.worker_shutdown_grace,
        "ctx": {"settings": settings},
    }


def worker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of :class:`arq.worker.Worker` for the task runs."""
    return {
        **_common_options(settings),
        "functions": [
            func(run_task, name=RunTask.name, max_tries=1000),
            func(deliver_report, name=DeliverReport.name, max_tries=1_000_000, timeout=60),
        ],
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_concurrency,
        "job_timeout": settings.job_timeout,
        "allow_abort_jobs": True,
        "ctx": {"settings": settings, "runs_tasks": True},
    }


def delivery_worker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of :class:`arq.worker.Worker` for callback attempts:
    their own queue and ``WEBHOOK_CONCURRENCY`` slots."""
    timeout = settings.delivery_job_timeout
    return {
        **_common_options(settings),
        "functions": [
            func(deliver_webhook, name=DeliverWebhook.name, max_tries=1_000_000, timeout=timeout),
            func(deliver_report, name=DeliverReport.name, max_tries=1_000_000, timeout=60),
        ],
        "queue_name": settings.delivery_queue_name,
        "max_jobs": settings.webhook_concurrency,
        "job_timeout": timeout,
        # An attempt's outcome is in the database; nothing reads arq's result
        # (the reconciler looks for the job itself, not its result).
        "keep_result": 0,
        # A deleted endpoint's queued attempts are aborted before they start.
        "allow_abort_jobs": True,
    }


def _forget(
    heartbeats: Heartbeats, attempt: tuple[str, int, int], _task: asyncio.Future[Any]
) -> None:
    heartbeats.discard(*attempt)


#: Of the jobs ``ARGV[4:]``, those due (their score in the queue ``KEYS[1]``
#: at most ``ARGV[1]``, in ms) and not in progress (no mark
#: ``in_progress_key_prefix + id``) are free: marks in progress, for ``ARGV[2]`` ms,
#: the first half of them (at least one), at most ``ARGV[3]``. Answers
#: ``[the index of the last job looked at, id, score, id, score, ...]``, or
#: ``[]``. arq's own check (``arq.worker.Worker.start_jobs``: WATCH, EXISTS,
#: ZSCORE, MULTI/PSETEX/EXEC) in one atomic step, past any number of jobs
#: running already. Half, so that workers polling together share a short
#: queue as arq's do; the caller asks again for the rest. It looks no further
#: than twice ``room`` free jobs: half of those fill the room, and a backlog
#: of thousands is not read job by job at every poll (arq hands over up to
#: five times ``max_jobs`` IDs; the script checked each of them, 2 ms of
#: Redis's time a poll with a backlog of 10,000, docs/performance.md).
CLAIM = """
local PREFIX = ARGV_PREFIX
local now, ttl, room = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local free, scores = {}, {}
for i = 4, #ARGV do
  if redis.call('EXISTS', PREFIX .. ARGV[i]) == 0 then
    local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if score and tonumber(score) <= now then
      free[#free + 1] = i
      scores[#scores + 1] = score
      if #free >= 2 * room then break end
    end
  end
end
local take = math.min(room, math.ceil(#free / 2))
if take == 0 then return {} end
local taken = {free[take] - 4}
for n = 1, take do
  redis.call('PSETEX', PREFIX .. ARGV[free[n]], ttl, '1')
  taken[#taken + 1] = ARGV[free[n]]
  taken[#taken + 1] = scores[n]
end
return taken
""".replace("ARGV_PREFIX", repr(in_progress_key_prefix))


class NudgedWorker(Worker):
    """arq's worker, woken as soon as the gateway queues a job that is due.

    arq polls its queue every ``poll_delay``; a run waits half of that on
    average before it starts, and a callback as long again. This worker also
    listens on the queue's nudge channel (:func:`jobs.protocol.nudge_channel`)
    and polls at once when a job is announced. Polling goes on as before, for
    deferred jobs, for jobs queued by anyone else, and when the channel is down.

    On SIGTERM it also waits for a poll that is starting jobs (see
    :meth:`_sleep_until_tasks_complete`). And a job that Redis failed before
    it could finish is given back at once (:meth:`run_job`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Clear while a poll is in :meth:`start_jobs`.
        self._started = asyncio.Event()
        self._started.set()
        #: Jobs whose in-progress mark is still to be taken off (Redis failed).
        self._unfinished: set[str] = set()
        self._claim_script: AsyncScript | None = None
        #: The last poll left due jobs unclaimed because every slot was taken.
        self._backlog = False

    async def _connect(self, outage: RedisOutage) -> ArqRedis:
        """arq's pool, tried until Redis answers (arq itself gives up after
        ``conn_retries`` and the worker would exit)."""
        assert self.redis_settings is not None
        settings = dataclasses.replace(self.redis_settings, conn_retries=0)
        while True:
            try:
                # Its transactions of one loop turn in one round trip: arq's
                # two a job, in the bursts that jobs start and end in.
                pool = merging(
                    await open_pool(
                        settings,
                        job_deserializer=self.job_deserializer,
                        job_serializer=self.job_serializer,
                        default_queue_name=self.queue_name,
                        expires_extra_ms=self.expires_extra_ms,
                    )
                )
            except REDIS_DOWN as exc:
                await outage.wait(exc)
            else:
                outage.over()
                return pool

    async def main(self) -> None:
        # arq's Worker.main, with the sleep between polls cut short by a nudge,
        # and a Redis outage waited out instead of ending the worker: jobs
        # running meanwhile go on (they report over HTTP), and polling
        # resumes when Redis answers again.
        outage = RedisOutage(f"worker of {self.queue_name}")
        if self._pool is None:
            self._pool = await self._connect(outage)
        log.info(
            "Starting worker for %d functions: %s",
            len(self.functions),
            ", ".join(self.functions),
        )
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        nudged = asyncio.Event()
        listener = asyncio.create_task(self._listen(nudged), name="worker-nudges")
        try:
            while True:
                nudged.clear()
                try:
                    await self._poll_iteration()
                except REDIS_DOWN as exc:
                    # Every pooled connection is stale after a Redis restart:
                    # drop them all at once, or each would fail a try of its
                    # own and the backoff would grow for nothing.
                    with contextlib.suppress(Exception):
                        await self.pool.connection_pool.disconnect()
                    await outage.wait(exc)
                    continue
                outage.over()
                if self.burst:
                    if 0 <= self.max_burst_jobs <= self._jobs_started():
                        await asyncio.gather(*self.tasks.values())
                        return
                    if await self.pool.zcard(self.queue_name) == 0:
                        await asyncio.gather(*self.tasks.values())
                        return
                await self._idle(nudged)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _idle(self, nudged: asyncio.Event) -> None:
        """Until the next poll: a nudge, a job ending while all slots were
        taken (one may be waiting for its slot), or ``poll_delay``; none if
        slots came free while the last poll left due jobs behind."""
        if self._backlog and self.job_counter < self.max_jobs:
            # Jobs end together (claimed together, finished in one round
            # trip): most of them ended while a poll took the few slots that
            # one had freed. Their slots are free, due jobs wait, and no
            # nudge will come for those: polled again at once.
            return
        wake = asyncio.ensure_future(nudged.wait())
        waits: set[asyncio.Future[Any]] = {wake}
        if self.job_counter >= self.max_jobs:
            waits.update(task for task in self.tasks.values() if not task.done())
        try:
            await asyncio.wait(waits, timeout=self.poll_delay_s, return_when="FIRST_COMPLETED")
        finally:
            wake.cancel()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq starts a job in four round trips (WATCH the in-progress mark,
        # EXISTS, ZSCORE, then MULTI/PSETEX/EXEC) and spends three on each job
        # it finds running already: every job of its own still in the queue,
        # so most of a busy worker's poll. Here one script (``CLAIM``) takes
        # half of the free jobs, past all those, in one round trip, and is
        # asked again for the rest: workers polling together share a short
        # queue (as arq's do) and a long one takes a few round trips.
        heartbeats: Heartbeats | None = self.ctx.get("heartbeats")
        self._started.clear()
        self._backlog = False
        try:
            # Its own running jobs are in progress: not sent to be looked at
            # again (with a full worker, the first ``max_jobs`` of every poll).
            ids = []
            for raw in job_ids:
                job_id = raw.decode()
                running = self.tasks.get(job_id)
                if running is None or running.done():
                    ids.append(job_id)
            ttl = int(self.in_progress_timeout_s * 1000)
            while ids and self.job_counter < self.max_jobs and self.allow_pick_jobs:
                room = self.max_jobs - self.job_counter
                found = await self._claim(
                    keys=[self.queue_name], args=[timestamp_ms(), ttl, room, *ids]
                )
                if not found:
                    return
                # No slot is taken before the claim answers, so a Redis error
                # there keeps none; and slots only came free meanwhile.
                ids = ids[int(found[0]) + 1 :]
                for raw, score in zip(found[1::2], found[2::2], strict=True):
                    await self.sem.acquire()  # one is free: it does not wait
                    self._start_claimed(raw.decode(), int(float(score)), heartbeats)
            self._backlog = bool(ids) and self.job_counter >= self.max_jobs
        finally:
            self._started.set()

    def _start_claimed(self, job_id: str, score: int, heartbeats: Heartbeats | None) -> None:
        """arq's start of a job marked in progress, its slot taken: its task."""
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job_id, score))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task
        attempt = parse_run_job_id(job_id)
        if heartbeats is not None and attempt:
            # Beats from the moment the job is taken, before its task gets
            # the loop to report its start.
            heartbeats.add(*attempt)
            task.add_done_callback(functools.partial(_forget, heartbeats, attempt))

    async def _claim(self, keys: list[str], args: list[Any]) -> list[Any]:
        if self._claim_script is None:
            self._claim_script = self.pool.register_script(CLAIM)
        return await self._claim_script(keys=keys, args=args)  # type: ignore[no-any-return]

    async def run_job(self, job_id: str, score: int) -> None:
        # arq marks a job in progress before this reads it, and takes the mark
        # off as it finishes it. A Redis error in between (the read, the
        # finish: a connection refused or timed out on a loaded host) ends
        # the task with the mark still on, and no worker would take the job
        # again until the mark expired (its timeout and 10 s: 72 s for a
        # callback, hours for a long task). The mark is this worker's own
        # (set by the poll that made this task), so it is taken off here, or
        # at the next poll if Redis is still failing, and the job, still in
        # the queue, runs again at once (arq's jobs are at least once).
        try:
            await super().run_job(job_id, score)
        except REDIS_DOWN as exc:
            log.warning(
                "job %s: Redis failed before it finished (%s); it is given back to the queue",
                job_id,
                exc,
            )
            self._unfinished.add(job_id)
            await self._give_back()
        except asyncio.CancelledError:
            # Cancelled (a stop past its grace) before arq's own handling of a
            # cancelled job could run: while it read the job, or as it finished.
            log.warning("job %s: stopped before it finished; it is given back to the queue", job_id)
            self._unfinished.add(job_id)
            await asyncio.shield(self._give_back())
            raise

    async def _give_back(self) -> None:
        """Take the in-progress marks of unfinished jobs off, where Redis lets us."""
        for job_id in list(self._unfinished):
            try:
                await self.pool.delete(in_progress_key_prefix + job_id)
            except REDIS_DOWN:
                return  # the next poll tries again
            self._unfinished.discard(job_id)

    async def _poll_iteration(self) -> None:
        if self._unfinished:
            await self._give_back()
        await super()._poll_iteration()

    async def _sleep_until_tasks_complete(self) -> None:
        # arq counts a finished job as running until its next poll removes it;
        # with a long poll delay, a stopping worker would wait for nothing.
        # And a poll that is starting jobs as the signal comes may have set a
        # job's in-progress key with no task made for it yet: cancelled
        # there, it would leave the key behind, and no worker would take that
        # job until the key expired (its timeout: a callback 72 s late). So
        # the poll is waited for too; it takes no new job after the signal
        # (``allow_pick_jobs``).
        await self._started.wait()
        running = [task for task in self.tasks.values() if not task.done()]
        if running:
            await asyncio.wait(running)

    async def _listen(self, nudged: asyncio.Event) -> None:
        # A job that a project's turn scored ahead of now (a burst of one
        # project's runs: a ms apart) is due only then: polled at once it
        # would not be taken, and the worker would wait for its next poll.
        # So a poll is also set for when announced jobs come due, at most
        # one every ``NUDGE_SPACING`` (each poll takes all due by then).
        loop = asyncio.get_running_loop()
        ahead: list[int] = []  # when announced jobs come due (ms), a heap
        wake: asyncio.TimerHandle | None = None

        def arm(due: int) -> None:
            nonlocal wake
            at = loop.time() + max((due - timestamp_ms()) / 1000, NUDGE_SPACING)
            if wake is not None and wake.when() <= at:
                return
            if wake is not None:
                wake.cancel()
            wake = loop.call_at(at, fire)

        def fire() -> None:
            nonlocal wake
            wake = None
            nudged.set()
            now = timestamp_ms()
            while ahead and ahead[0] <= now:
                heapq.heappop(ahead)
            if ahead:
                arm(ahead[0])

        def heard(message: str) -> None:
            due = nudge_due(message)
            if due is None or due <= timestamp_ms() or len(ahead) >= MAX_AHEAD:
                nudged.set()
                return
            heapq.heappush(ahead, due)
            arm(due)

        try:
            await listen_forever(
                self.pool,
                nudge_channel(self.queue_name, redis_database(self.pool)),
                heard,
                what="worker nudges (polling goes on)",
            )
        finally:
            if wake is not None:
                wake.cancel()


def build_worker(settings: Settings, **overrides: Any) -> Worker:
    """The worker of task runs (``overrides``: more :class:`~arq.worker.Worker` options)."""
    return NudgedWorker(**{**worker_options(settings), **overrides})


def build_delivery_worker(settings: Settings, **overrides: Any) -> Worker:
    """The worker of callback attempts."""
    return NudgedWorker(**{**delivery_worker_options(settings), **overrides})


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (uvicorn's ``standard`` extra brings
    it): a worker's time goes mostly to sockets (Redis, reports, callbacks),
    which uvloop serves at a fraction of the CPU."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_workers(settings: Settings) -> None:
    """``gateway worker``: the task worker and the delivery worker in one
    process, on one event loop, until SIGINT or SIGTERM (then each finishes
    its running jobs, up to ``WORKER_SHUTDOWN_GRACE``)."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    workers = [
        build_worker(settings, handle_signals=False),
        build_delivery_worker(settings, handle_signals=False),
    ]

    def stop(signum: signal.Signals) -> None:
        for worker in workers:
            worker.handle_sig_wait_for_completion(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    for worker in workers:
        worker.main_task = loop.create_task(worker.main())
    try:
        loop.run_until_complete(
            asyncio.gather(*(w.main_task for w in workers if w.main_task), return_exceptions=True)
        )
    finally:
        for worker in workers:
            loop.run_until_complete(worker.close())
        loop.close()
        tracing.shutdown()  # what the spans' batch still holds


def _settings_class(options: dict[str, Any], doc: str) -> type:
    names = (
        "functions",
        "queue_name",
        "redis_settings",
        "on_startup",
        "on_shutdown",
        "max_jobs",
        "job_timeout",
        "job_completion_wait",
        "poll_delay",
        "keep_result",
        "allow_abort_jobs",
        "ctx",
    )
    return type("WorkerSettings", (), {"__doc__": doc, **{n: options[n] for n in names}})


_SETTINGS = Settings.from_env()
#: ``arq jobs.worker.WorkerSettings``: arq's own worker for the task runs
#: (it polls; ``gateway worker`` is also woken by the gateway).
WorkerSettings = _settings_class(worker_options(_SETTINGS), "The task runs, for the arq CLI.")
#: ``arq jobs.worker.DeliveryWorkerSettings``: callback attempts, for the arq CLI.
DeliveryWorkerSettings = _settings_class(
    delivery_worker_options(_SETTINGS), "Callback attempts, for the arq CLI."
)
