"""The worker's Redis transactions of one loop turn go out together (``jobs.merged``).

Against a real Redis: what each transaction returns and writes is what
redis-py's own pipeline returns and writes, one transaction's error is its
own, a pipeline that watches keys goes as before, and a Redis that goes away
fails every waiting transaction at once (none hangs) and is used again once
it is back.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
from pathlib import Path
from typing import Any

import pytest
from arq.connections import create_pool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError

from gateway.cli.embedded_redis import EmbeddedRedis
from jobs.merged import MergingRedis, merging
from jobs.packing import open_pool
from jobs.protocol import redis_settings


async def _pools(url: str) -> tuple[Any, MergingRedis]:
    plain = await create_pool(redis_settings(url))
    return plain, merging(plain)


def _transaction(pipe: Any, key: str) -> None:
    """arq's start of a job, and a little more: a read, a count, an expiry,
    a sorted set member removed, a hash written."""
    pipe.get(f"{key}:job")
    pipe.incr(f"{key}:try")
    pipe.expire(f"{key}:try", 88400)
    pipe.zrem(f"{key}:abort", "job")
    pipe.hset(f"{key}:h", mapping={"a": "1", "b": "2"})
    pipe.hgetall(f"{key}:h")


async def _state(redis: Any, key: str) -> tuple[Any, ...]:
    return (
        await redis.get(f"{key}:job"),
        await redis.get(f"{key}:try"),
        await redis.ttl(f"{key}:try") > 0,
        await redis.zrange(f"{key}:abort", 0, -1),
        await redis.hgetall(f"{key}:h"),
    )


async def _seed(redis: Any, key: str) -> None:
    await redis.set(f"{key}:job", b"data")
    await redis.zadd(f"{key}:abort", {"job": 1, "other": 2})


def test_transactions_of_one_turn_go_in_one_send_and_answer_as_redis_py(
    redis_server: EmbeddedRedis,
) -> None:
    async def scenario() -> None:
        plain, merged = await _pools(redis_server.url + "/0")
        tag = secrets.token_hex(4)
        try:
            keys = [f"merge-test:{tag}:{n}" for n in range(20)]
            twins = [f"merge-test:{tag}:plain:{n}" for n in range(20)]
            for key in keys + twins:
                await _seed(plain, key)

            async def run(redis: Any, key: str) -> list[Any]:
                async with redis.pipeline(transaction=True) as pipe:
                    _transaction(pipe, key)
                    return list(await pipe.execute())

            assert merged._merger is None or merged._merger.sends == 0
            got = await asyncio.gather(*(run(merged, key) for key in keys))
            want = await asyncio.gather(*(run(plain, key) for key in twins))
            assert got == want
            assert got[0] == [b"data", 1, True, 1, 2, {b"a": b"1", b"b": b"2"}]
            merger = merged._merger
            assert merger is not None
            # All twenty in one round trip.
            assert (merger.sends, merger.transactions) == (1, 20)
            for key, twin in zip(keys, twins, strict=True):
                assert await _state(plain, key) == await _state(plain, twin)

            # One after the other, each goes alone (nothing waits for company).
            for key in keys[:3]:
                await run(merged, key)
            assert (merger.sends, merger.transactions) == (4, 23)
        finally:
            await plain.aclose()

    asyncio.run(scenario())


def test_one_transactions_error_is_its_own(redis_server: EmbeddedRedis) -> None:
    async def scenario() -> None:
        plain, merged = await _pools(redis_server.url + "/0")
        tag = secrets.token_hex(4)
        try:
            bad, good = f"merge-test:{tag}:bad", f"merge-test:{tag}:good"
            await plain.set(bad, b"not a number")
            await plain.set(good, b"1")

            async def run(redis: Any, key: str) -> list[Any]:
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.incr(key)  # fails on a string that is no number
                    pipe.set(f"{key}:after", b"written")
                    return list(await pipe.execute())

            results = await asyncio.gather(
                run(merged, bad), run(merged, good), return_exceptions=True
            )
            assert isinstance(results[0], ResponseError)
            assert results[1] == [2, True]
            # Redis ran the rest of the failed transaction, as it does for
            # redis-py's own pipeline; and the next transactions are read right.
            assert await plain.get(f"{bad}:after") == b"written"
            with pytest.raises(ResponseError):
                await run(plain, bad)
            assert await run(merged, good) == [3, True]
            assert merged._merger is not None and merged._merger.sends == 2
        finally:
            await plain.aclose()

    asyncio.run(scenario())


def test_a_pipeline_that_watches_goes_as_before(redis_server: EmbeddedRedis) -> None:
    async def scenario() -> None:
        plain, merged = await _pools(redis_server.url + "/0")
        key = f"merge-test:{secrets.token_hex(4)}:watched"
        try:
            await plain.set(key, b"1")
            async with merged.pipeline(transaction=True) as pipe:
                await pipe.watch(key)
                assert await pipe.get(key) == b"1"
                await plain.set(key, b"changed")  # another client, meanwhile
                pipe.multi()
                pipe.set(key, b"mine")
                with pytest.raises(WatchError):
                    await pipe.execute()
            assert await plain.get(key) == b"changed"
            assert merged._merger is None or merged._merger.sends == 0
        finally:
            await plain.aclose()

    asyncio.run(scenario())


def test_a_redis_that_goes_away_fails_every_waiting_transaction(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    port = server.port

    async def scenario() -> None:
        plain, merged = await _pools(server.url + "/0")

        async def run(key: str) -> list[Any]:
            async with merged.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.get(key)
                return list(await pipe.execute())

        try:
            assert await run("k") == [1, b"1"]
            merger = merged._merger
            assert merger is not None
            # Gone while a send waits for its replies (Redis holds them:
            # CLIENT PAUSE), then gone before the next one connects.
            await plain.execute_command("CLIENT", "PAUSE", "10000", "ALL")
            waiting = asyncio.gather(*(run(f"k{n}") for n in range(5)), return_exceptions=True)
            while merger.sends < 2:  # noqa: ASYNC110 (the send starts on the loop's next turns)
                await asyncio.sleep(0)
            server.stop()
            for results in (
                await asyncio.wait_for(waiting, 10),
                await asyncio.wait_for(
                    asyncio.gather(*(run(f"k{n}") for n in range(5)), return_exceptions=True), 10
                ),
            ):
                assert all(isinstance(r, (RedisConnectionError, OSError)) for r in results), results
            restarted = EmbeddedRedis(tmp_path / "redis", port=port, appendonly=False).start()
            try:
                got = await asyncio.gather(*(run(f"k{n}") for n in range(5)))
                assert got == [[1, b"1"]] * 5
            finally:
                restarted.stop()
        finally:
            await plain.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_send_waiting_for_its_reply_outlives_a_collection(redis_server: EmbeddedRedis) -> None:
    """The loop holds tasks weakly and the pool its connections in use: a send
    whose reply is slow, on a connection the pool made fresh, is still there
    after the cycle collector runs, and every transaction in it is answered."""

    async def scenario() -> None:
        merged = merging(await open_pool(redis_settings(redis_server.url + "/0")))
        tag = secrets.token_hex(4)
        try:

            async def run(n: int) -> list[Any]:
                async with merged.pipeline(transaction=True) as pipe:
                    pipe.incr(f"merge-test:{tag}:gc:{n}")
                    if n == 0:  # the reply to the whole send waits for it
                        pipe.execute_command("DEBUG", "SLEEP", "0.3")
                    return list(await pipe.execute())

            runs = [asyncio.ensure_future(run(n)) for n in range(5)]
            while not all(run.done() for run in runs):
                gc.collect()
                await asyncio.sleep(0.02)
            assert [run.result()[0] for run in runs] == [1] * 5
            assert merged._merger is not None and merged._merger.sends == 1
        finally:
            await merged.delete(*(f"merge-test:{tag}:gc:{n}" for n in range(5)))
            await merged.aclose()

    asyncio.run(scenario())
