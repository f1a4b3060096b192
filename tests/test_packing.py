"""Redis commands packed by hiredis (``jobs.packing``).

The bytes are redis-py's own for every kind of argument it takes, the same
arguments are refused, and a pool from ``open_pool`` runs arq's jobs, a
transaction, a split command name and a large value against a real Redis
with every connection packing in C.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from typing import Any

import pytest
from arq.jobs import Job, JobStatus
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from gateway.cli.embedded_redis import EmbeddedRedis
from jobs.packing import open_pool, packing_in_c
from jobs.protocol import redis_settings


def _argument(rng: random.Random) -> Any:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randrange(-(2**70), 2**70)
    if kind == 1:
        return rng.choice([0.0, -0.0, 1.5, 1e-7, 1e300, float("inf"), rng.random() * 1e6])
    if kind == 2:
        return "".join(rng.choice("aé字 \r\n$*😀") for _ in range(rng.randrange(12)))
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
    if kind == 4:
        return memoryview(b"x" * rng.randrange(20))
    if kind == 5:
        return b"v" * rng.choice([5999, 6000, 6001, 70_000])  # around redis-py's cutoff
    return "SET"


def _joined(chunks: list[Any]) -> bytes:
    return b"".join(bytes(chunk) for chunk in chunks)


def test_the_bytes_are_redis_pys_for_every_kind_of_argument() -> None:
    rng = random.Random(20261204)
    python, in_c = Connection(), packing_in_c(Connection)()
    names: list[Any] = ["SET", b"EVALSHA", "CONFIG GET", b"CLIENT SETNAME", "ZADD"]
    commands = [
        (rng.choice(names), *(_argument(rng) for _ in range(rng.randrange(6)))) for _ in range(500)
    ]
    for command in commands:
        assert _joined(in_c.pack_command(*command)) == _joined(python.pack_command(*command))
    # A pipeline's commands, packed together.
    assert _joined(in_c.pack_commands(commands)) == _joined(python.pack_commands(commands))


@pytest.mark.parametrize("bad", [None, True, [1], {"a": 1}, object()])
def test_what_redis_py_refuses_is_refused(bad: Any) -> None:
    for connection in (Connection(), packing_in_c(Connection)()):
        with pytest.raises(DataError):
            connection.pack_command("SET", "key", bad)


def test_one_class_for_each_kind_of_connection() -> None:
    plain = packing_in_c(Connection)
    assert packing_in_c(Connection) is plain
    assert packing_in_c(plain) is plain
    unix = packing_in_c(UnixDomainSocketConnection)
    assert issubclass(unix, UnixDomainSocketConnection) and unix is not plain


async def _noop(ctx: dict[str, Any]) -> str:
    return "done"


def test_a_pool_packing_in_c_runs_jobs_and_commands(redis_server: EmbeddedRedis) -> None:
    async def scenario() -> None:
        url = redis_server.url + "/3"
        pool = await open_pool(redis_settings(url), default_queue_name="packing")
        key = f"packing:{secrets.token_hex(4)}"
        try:
            # Every connection the pool hands out from now on packs in C.
            connection = await pool.connection_pool.get_connection()
            assert type(connection) is packing_in_c(Connection)
            await pool.connection_pool.release(connection)

            big = secrets.token_bytes(200_000)
            await pool.set(key, big)
            assert await pool.get(key) == big
            assert await pool.config_get("maxmemory-policy")  # "CONFIG GET", split
            async with pool.pipeline(transaction=True) as pipe:
                pipe.incr(f"{key}:n")
                pipe.incrbyfloat(f"{key}:n", 1.5)
                pipe.hset(f"{key}:h", "é", "字")
                assert await pipe.execute() == [1, 2.5, 1]
            assert await pool.hget(f"{key}:h", "é") == "字".encode()  # type: ignore[misc]

            with pytest.raises(DataError):
                await pool.set(key, None)  # type: ignore[arg-type]
            assert await pool.get(key) == big  # refused before anything was sent

            job = await pool.enqueue_job("noop", 1, "два", _job_id=key)
            assert job is not None
            assert await Job(key, pool, _queue_name="packing").status() == JobStatus.queued
            assert await pool.zscore("packing", key) is not None
        finally:
            await pool.delete(key, f"{key}:n", f"{key}:h", f"arq:job:{key}")
            await pool.zrem("packing", key)
            await pool.aclose()

    asyncio.run(scenario())
