"""gateway.queue: one round trip to Redis, and jobs arq itself cannot tell apart."""

from __future__ import annotations

import asyncio
import time

import pytest
from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import Job, JobStatus

from gateway.cli.embedded_redis import EmbeddedRedis
from gateway.queue import QueuedJob, enqueue_job, enqueue_jobs
from tests.conftest import Databases, _redis_db, launch_stack


def test_jobs_read_back_as_arq_jobs_and_ids_stay_unique(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        redis = await create_pool(RedisSettings.from_dsn(redis_server.url + "/14"))
        try:
            await redis.flushdb()
            before_ms = time.time() * 1000
            assert await enqueue_job(redis, "run_task", 1, "x", job_id="j1", queue_name="q")
            # The same ID again, by us or by arq itself: refused, like arq does.
            assert not await enqueue_job(redis, "run_task", 2, job_id="j1", queue_name="q")
            assert await redis.enqueue_job("run_task", _job_id="j1", _queue_name="q") is None

            job = Job("j1", redis, _queue_name="q")
            info = await job.info()
            assert info is not None
            assert (info.function, info.args, info.kwargs) == ("run_task", (1, "x"), {})
            assert await job.status() == JobStatus.queued
            assert before_ms - 1000 <= info.enqueue_time.timestamp() * 1000 <= time.time() * 1000

            assert await enqueue_job(
                redis, "deliver_webhook", "d1", job_id="j2", queue_name="q", defer_seconds=60
            )
            due = await redis.zscore("q", "j2")
            assert due is not None and due >= before_ms + 59_000
            assert await Job("j2", redis, _queue_name="q").status() == JobStatus.deferred
            # Kept until a day after it is due, as arq keeps its own jobs.
            ttl_ms = await redis.pttl(job_key_prefix + "j2")
            kept_ms = 60_000 + redis.expires_extra_ms
            assert kept_ms - 5_000 <= ttl_ms <= kept_ms
        finally:
            await redis.flushdb()
            await redis.aclose()

    asyncio.run(main())


def test_many_jobs_go_in_one_pipeline_each_checked_alone(redis_server: EmbeddedRedis) -> None:
    async def main() -> None:
        redis = await create_pool(RedisSettings.from_dsn(redis_server.url + "/14"))
        try:
            await redis.flushdb()
            assert await enqueue_job(redis, "run_task", 0, job_id="p0", queue_name="q")
            jobs = [QueuedJob("run_task", (n,), f"p{n}", "q") for n in range(5)]
            jobs.append(QueuedJob("deliver_webhook", ("d",), "later", "q", defer_seconds=30))
            # p0 was there already: refused alone, the others go in.
            assert await enqueue_jobs(redis, jobs) == [False, True, True, True, True, True]
            for n in range(1, 5):
                info = await Job(f"p{n}", redis, _queue_name="q").info()
                assert info is not None and info.args == (n,)
            assert await Job("later", redis, _queue_name="q").status() == JobStatus.deferred
            assert await enqueue_jobs(redis, []) == []
        finally:
            await redis.flushdb()
            await redis.aclose()

    asyncio.run(main())


def test_a_pipeline_of_jobs_asks_nothing_first_and_survives_a_flushed_script(
    redis_server: EmbeddedRedis,
) -> None:
    """Many jobs are one send of EVALSHA calls: no SCRIPT EXISTS before it
    (redis-py's scripts on a pipeline ask it every time). A Redis that lost
    the script (SCRIPT FLUSH, a restart) gets it loaded once, and every job
    still goes in once."""

    async def calls(redis: ArqRedis) -> dict[str, int]:
        stats = await redis.info("commandstats")
        return {name: value["calls"] for name, value in stats.items()}

    async def main() -> None:
        redis = await create_pool(RedisSettings.from_dsn(redis_server.url + "/14"))
        try:
            await redis.flushdb()
            await redis.script_flush()
            await redis.config_resetstat()
            first = [QueuedJob("run_task", (n,), f"f{n}", "q") for n in range(4)]
            assert await enqueue_jobs(redis, first) == [True] * 4
            counted = await calls(redis)
            # SCRIPT LOAD alone (a Redis older than 7 counts SCRIPT's
            # subcommands together).
            assert counted.get("cmdstat_script|load", counted.get("cmdstat_script")) == 1, counted
            assert "cmdstat_script|exists" not in counted, counted
            assert counted["cmdstat_evalsha"] == 8, counted  # 4 refused, 4 again
            await redis.config_resetstat()
            again = [QueuedJob("run_task", (n,), f"g{n}", "q") for n in range(4)]
            again.append(first[0])  # there already: refused
            assert await enqueue_jobs(redis, again) == [True] * 4 + [False]
            counted = await calls(redis)
            assert not [name for name in counted if name.startswith("cmdstat_script")], counted
            assert counted["cmdstat_evalsha"] == 5, counted
            assert await redis.zcard("q") == 8
            for n in range(4):
                info = await Job(f"g{n}", redis, _queue_name="q").info()
                assert info is not None and info.args == (n,)
        finally:
            await redis.flushdb()
            await redis.aclose()

    asyncio.run(main())


def test_an_idle_worker_is_woken_as_a_job_is_queued(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With a poll every 60 s, runs still complete within the 30 s a
    long-poll waits: the enqueue of each (after the worker's first poll)
    published the nudge that woke it, also when the scheduler released a
    delayed run, and a job that waited for the one slot started as it freed."""
    with launch_stack(
        "nudge",
        databases.new("nudge"),
        f"{redis_server.url}/{_redis_db(database_url, 4)}",
        tmp_path_factory.mktemp("logs-nudge"),
        WORKER_POLL_DELAY="60",
        WORKER_CONCURRENCY="1",
    ) as stack:
        for n in range(3):
            assert stack.run("echo", {"n": n})["status"] == "COMPLETED"
        assert stack.run("echo", {"later": True}, delay=0.3)["status"] == "COMPLETED"
        # Queued while the one slot was taken: its nudge found the worker full,
        # and the end of the first job woke the worker for it.
        with stack.client() as client:
            ids = [
                client.post(
                    "/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 0.3}}
                ).json()["id"]
                for _ in range(2)
            ]
            finals = [client.get(f"/api/v1/runs/{i}", params={"wait": 30}).json() for i in ids]
        assert [f["status"] for f in finals] == ["COMPLETED", "COMPLETED"], finals
