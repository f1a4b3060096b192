"""A worker whose Redis fails in the middle of a job gives the job back at once.

arq marks a job in progress before it reads it and takes the mark off as it
finishes it; a Redis error in between used to leave the mark on, and no worker
took the job again until it expired (a callback 72 s late). Here a real Redis
refuses one command of arq's read to the first worker (an ACL without
``INCRBY``), as a dropped or timed-out connection would fail it: the job goes
back to the queue, the worker keeps polling, and a second worker runs the job
long before its mark would have expired.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import redis
import redis.asyncio
from arq import ArqRedis, func
from arq.connections import create_pool
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms

from gateway.cli.embedded_redis import EmbeddedRedis
from gateway.queue import QueuedJob, enqueue_jobs
from jobs.protocol import nudge_channel, redis_settings
from jobs.worker import NudgedWorker

#: A database no stack of the suite uses (theirs count from 1: ``_redis_db``).
DB = 0
#: The job's timeout, so its in-progress mark would last 10 minutes and 10 s.
TIMEOUT = 600


async def _stop(tasks: list[asyncio.Task[None]], workers: list[NudgedWorker]) -> None:
    """Cancel the workers' main tasks, let the jobs still finishing end (they
    use the pool: closed before, a connection one opens is left unclosed),
    then close each worker's pool."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w in workers:
        await asyncio.gather(*w.tasks.values(), return_exceptions=True)
        if w._pool is not None:
            await w._pool.aclose()


class Watched(NudgedWorker):
    """Our worker, with an event for each job it has tried."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tried = asyncio.Event()

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        finally:
            self.tried.set()


async def _scenario(url: str) -> None:
    queue = f"test-give-back-{secrets.token_hex(4)}"
    ran = asyncio.Event()

    async def job(ctx: dict[str, Any], value: str) -> str:
        ran.set()
        return value

    def worker(user_url: str) -> Watched:
        return Watched(
            functions=[func(job, name="job", timeout=TIMEOUT)],
            queue_name=queue,
            redis_settings=redis_settings(user_url),
            handle_signals=False,
            poll_delay=0.05,
        )

    pool: ArqRedis = await create_pool(redis_settings(f"{url}/{DB}"))
    user = f"no-incr-{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    host = url.removeprefix("redis://")
    await pool.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all", "-incrby"
    )
    first = worker(f"redis://{user}:{password}@{host}/{DB}")
    second = worker(f"{url}/{DB}")
    tasks: list[asyncio.Task[None]] = []
    try:
        [queued] = await enqueue_jobs(
            pool, [QueuedJob("job", ("given back",), "job-1", queue, kwargs={})]
        )
        assert queued
        tasks.append(asyncio.create_task(first.main()))
        await asyncio.wait_for(first.tried.wait(), 10)
        # The read failed, and the mark is off: the job waits in the queue.
        assert not ran.is_set()
        assert not await pool.exists(in_progress_key_prefix + "job-1")
        assert await pool.zscore(queue, "job-1") is not None
        # The worker is still polling (it takes the job again, and fails again).
        first.tried.clear()
        await asyncio.wait_for(first.tried.wait(), 10)
        assert not tasks[0].done()
        # Stopped as a signal stops it: no new job, the one in hand ended.
        first.allow_pick_jobs = False
        await asyncio.wait_for(first._sleep_until_tasks_complete(), 10)
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        assert not await pool.exists(in_progress_key_prefix + "job-1")
        # Another worker runs it now, not when a mark would have expired.
        tasks.append(asyncio.create_task(second.main()))
        await asyncio.wait_for(ran.wait(), 10)
    finally:
        await _stop(tasks, [first, second])
        await pool.execute_command("ACL", "DELUSER", user)
        await pool.delete(queue)
        await pool.aclose()


def test_a_job_whose_redis_failed_mid_way_runs_again_at_once(
    redis_server: EmbeddedRedis,
) -> None:
    asyncio.run(_scenario(redis_server.url))
    with redis.Redis.from_url(f"{redis_server.url}/{DB}") as client:
        assert client.get("arq:result:job-1") is not None


async def _race(url: str) -> None:
    """Three workers of two slots each on one queue of 60 jobs, and one job
    deferred: every due job starts once, the deferred one not before its time."""
    tag = secrets.token_hex(4)
    queue = f"test-claim-{tag}"
    runs: dict[str, int] = {}
    running: set[str] = set()
    overlaps: list[str] = []
    done = asyncio.Event()
    total = 60

    async def job(ctx: dict[str, Any], value: str) -> str:
        if value in running:
            overlaps.append(value)
        running.add(value)
        runs[value] = runs.get(value, 0) + 1
        await asyncio.sleep(0)  # another job of the same worker may start meanwhile
        running.discard(value)
        if sum(runs.get(f"{tag}-{n}", 0) for n in range(total)) >= total:
            done.set()
        return value

    workers = [
        NudgedWorker(
            functions=[func(job, name="job", timeout=TIMEOUT)],
            queue_name=queue,
            redis_settings=redis_settings(f"{url}/{DB}"),
            handle_signals=False,
            poll_delay=0.01,
            max_jobs=2,
        )
        for _ in range(3)
    ]
    pool: ArqRedis = await create_pool(redis_settings(f"{url}/{DB}"))
    tasks = [asyncio.create_task(w.main()) for w in workers]
    try:
        jobs = [
            QueuedJob("job", (f"{tag}-{n}",), f"{tag}-{n}", queue, kwargs={}) for n in range(total)
        ]
        later = QueuedJob(
            "job", (f"{tag}-later",), f"{tag}-later", queue, kwargs={}, defer_seconds=3600
        )
        assert all(await enqueue_jobs(pool, [*jobs, later]))
        await asyncio.wait_for(done.wait(), 30)
        # Every worker's next polls read the deferred job too, and leave it.
        for w in workers:
            await asyncio.wait_for(w._started.wait(), 10)
        assert runs == {f"{tag}-{n}": 1 for n in range(total)}
        assert not overlaps
        assert await pool.zscore(queue, f"{tag}-later") is not None
        assert not await pool.exists(in_progress_key_prefix + f"{tag}-later")
        # Each worker took some: the claim shares a poll's jobs, it does not hoard them.
        assert all(w.jobs_complete + len(w.tasks) > 0 for w in workers)
    finally:
        await _stop(tasks, workers)
        await pool.delete(queue, f"arq:job:{tag}-later")
        await pool.aclose()


def test_workers_racing_for_a_queue_start_each_due_job_once(redis_server: EmbeddedRedis) -> None:
    asyncio.run(_race(redis_server.url))


async def _ahead(url: str) -> None:
    """A burst of one project's jobs, whose turns are taken for the next
    1.5 s already (it queued a backlog just before): its turns score them a ms
    apart from there, ahead of now. A worker that polls once a minute still
    starts each as it comes due, not before: each nudge says when its job is
    due."""
    tag = secrets.token_hex(4)
    queue = f"test-ahead-{tag}"
    total = 40
    started: dict[str, float] = {}
    done = asyncio.Event()

    async def job(ctx: dict[str, Any], value: str) -> None:
        started[value] = asyncio.get_running_loop().time()
        if len(started) == total:
            done.set()

    worker = NudgedWorker(
        functions=[func(job, name="job", timeout=TIMEOUT)],
        queue_name=queue,
        redis_settings=redis_settings(f"{url}/{DB}"),
        handle_signals=False,
        poll_delay=60,
        max_jobs=total,
    )
    pool: ArqRedis = await create_pool(redis_settings(f"{url}/{DB}"))
    task = asyncio.create_task(worker.main())
    try:
        channel = nudge_channel(queue, DB)
        while (await pool.pubsub_numsub(channel))[0][1] < 1:  # noqa: ASYNC110 (in Redis)
            await asyncio.sleep(0.01)  # the worker subscribes as it starts
        await asyncio.wait_for(worker._started.wait(), 10)
        await pool.set(f"{queue}:turn:one-project", timestamp_ms() + 1500)
        jobs = [
            QueuedJob("job", (f"{tag}-{n}",), f"{tag}-{n}", queue, fair_key="one-project")
            for n in range(total)
        ]
        queued_at = asyncio.get_running_loop().time()
        assert all(await enqueue_jobs(pool, jobs))
        scores = sorted(score for _, score in await pool.zrange(queue, 0, -1, withscores=True))
        assert scores[0] > timestamp_ms() + 1000 and scores[-1] - scores[0] == total - 1
        await asyncio.wait_for(done.wait(), 20)  # not at the next poll, a minute on
        assert min(started.values()) - queued_at >= 1.0  # none before it was due
    finally:
        await _stop([task], [worker])
        await pool.delete(queue, f"{queue}:turn", f"{queue}:turn:one-project")
        await pool.aclose()


def test_jobs_announced_ahead_of_their_time_start_when_due(redis_server: EmbeddedRedis) -> None:
    asyncio.run(_ahead(redis_server.url))


def test_a_job_is_announced_on_its_own_databases_channel_only(redis_server: EmbeddedRedis) -> None:
    """Redis's channels are the server's: a gateway on database 7 must not wake
    (nor count as listened to by) the workers of database 0's queue."""
    queue = f"nudges-{secrets.token_hex(3)}"
    ours, other = nudge_channel(queue, 7), nudge_channel(queue, 0)
    assert ours != other

    async def scenario() -> None:
        pool: ArqRedis = await create_pool(redis_settings(f"{redis_server.url}/7"))
        listener = redis.asyncio.Redis.from_url(redis_server.url)
        pubsub = listener.pubsub()
        try:
            await pubsub.subscribe(ours, other)
            for _ in range(2):  # the two confirmations
                assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
            assert all(await enqueue_jobs(pool, [QueuedJob("job", ("x",), "job-x", queue)]))
            await pool.publish(other, "end")  # after the job's nudge, were it sent there
            heard = [await pubsub.get_message(timeout=5) for _ in range(2)]
            assert [(m["channel"].decode(), m["data"].decode().split(" ")[0]) for m in heard] == [
                (ours, "job-x"),
                (other, "end"),
            ]
        finally:
            await pubsub.aclose()
            await listener.aclose()
            await pool.delete(queue, "arq:job:job-x")
            await pool.aclose()

    asyncio.run(scenario())


async def _ending_together(url: str) -> None:
    """Jobs claimed together end together, and may end just after a poll
    took the slots that the first of them freed. A worker that polls once a
    minute, with due jobs still queued and no nudge to come for them, polls
    again at once when it finds its slots free, not a minute later."""
    tag = secrets.token_hex(4)
    queue = f"test-together-{tag}"
    total = 6
    ended = asyncio.Event()
    gate = asyncio.Event()
    ran: list[str] = []

    async def job(ctx: dict[str, Any], value: str) -> None:
        await gate.wait()
        ran.append(value)
        if len(ran) == total:
            ended.set()

    class EndingAfterPolls(NudgedWorker):
        async def heart_beat(self) -> None:  # the last step of every poll
            await super().heart_beat()
            running = [task for task in self.tasks.values() if not task.done()]
            if running:
                gate.set()  # every job running ends now, the poll over
                await asyncio.wait(running)
                gate.clear()

    pool: ArqRedis = await create_pool(redis_settings(f"{url}/{DB}"))
    # Queued before the worker starts: no nudge will come for any of them.
    jobs = [QueuedJob("job", (f"{tag}-{n}",), f"{tag}-{n}", queue) for n in range(total)]
    assert all(await enqueue_jobs(pool, jobs))
    worker = EndingAfterPolls(
        functions=[func(job, name="job", timeout=TIMEOUT)],
        queue_name=queue,
        redis_settings=redis_settings(f"{url}/{DB}"),
        handle_signals=False,
        poll_delay=60,
        max_jobs=2,
    )
    task = asyncio.create_task(worker.main())
    try:
        await asyncio.wait_for(ended.wait(), 20)  # not one poll a minute
        assert sorted(ran) == sorted(f"{tag}-{n}" for n in range(total))
    finally:
        await _stop([task], [worker])
        await pool.delete(queue, *(f"arq:job:{tag}-{n}" for n in range(total)))
        await pool.aclose()


def test_slots_freed_behind_a_poll_are_filled_at_once(redis_server: EmbeddedRedis) -> None:
    asyncio.run(_ending_together(redis_server.url))
