"""Chaos: many runs with callbacks while a worker, Redis, the gateway and the
receiver each fail once, mid-stream. Prints one line:

    runs N, final N, lost 0, double-final 0, callbacks expected E, received E

    .venv/bin/python bench/chaos.py 1000 [--postgres postgresql://root@127.0.0.1:5432/test]

Every process is real (redis-server, two gateway processes, a worker, a
callback dispatcher, a receiver on loopback).
The faults, in order, each while runs are in flight:

1. the worker is killed (SIGKILL) and a new one started;
2. the dispatcher is killed (SIGKILL) and a new one started;
3. Redis loses every key (FLUSHDB): queued jobs, retries, handed-over callbacks;
4. the gateway is stopped for two seconds (clients retry their triggers with
   the same idempotency key; workers retry their reports);
5. the receiver refuses connections for three seconds.

Then it waits for every run to be final and every final status to be called
back, and checks the database: no run may have two final transitions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import random
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from db.migrate import upgrade  # noqa: E402
from gateway.cli.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from tests.helpers import Process, child_env, db_query, wait_http_ok  # noqa: E402
from tests.receiver import Receiver  # noqa: E402

FINAL = ("COMPLETED", "FAILED", "CANCELED", "EXPIRED", "TIMED_OUT")
SECRET = "chaos-secret-0123456789abcdef"


@dataclasses.dataclass
class Summary:
    runs: int
    final: int
    lost: int
    double_final: int
    callbacks_expected: int
    callbacks_received: int
    unstable_ids: int
    #: COMPLETED transitions as /metrics counts them (summed over both
    #: processes), and as the database logged them since the gateway's restart.
    metrics_completed: float = 0.0
    completed_since_restart: int = 0
    #: Seconds spent triggering (through the faults), until every run was
    #: final, and until every callback had arrived.
    trigger_seconds: float = 0.0
    final_seconds: float = 0.0
    callback_seconds: float = 0.0

    def line(self) -> str:
        return (
            f"runs {self.runs}, final {self.final}, lost {self.lost}, "
            f"double-final {self.double_final}, callbacks expected "
            f"{self.callbacks_expected}, received {self.callbacks_received} "
            f"(triggered in {self.trigger_seconds} s, all final {self.final_seconds} s "
            f"later, all called back {self.callback_seconds} s after that)"
        )


class Stack:
    def __init__(self, workdir: Path, database_url: str) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.redis = EmbeddedRedis(workdir / "redis", appendonly=False).start()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = child_env(
            DATABASE_URL=database_url,
            REDIS_URL=self.redis.url,
            GATEWAY_SECRET_KEY=SECRET,
            PORT=str(self.port),
            GATEWAY_URL=self.base_url,
            WORKER_CONCURRENCY="20",
            WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
            WEBHOOK_RETRY_SCHEDULE="0,0.2,0.5,1,1,2,2,3,3,5,5,5",
            WEBHOOK_TIMEOUT="2",
            HEARTBEAT_INTERVAL="0.3",
            HEARTBEAT_TIMEOUT="3",
            RECONCILE_INTERVAL="0.5",
            RECONCILE_GRACE="1",
            WORKER_SHUTDOWN_GRACE="2",
            LOG_LEVEL="WARNING",
            # Two gateway processes behind one database: each report applied once.
            WEB_CONCURRENCY="2",
            DATA_DIR=str(workdir),
        )
        self.restarted_at = dt.datetime.now(dt.UTC)
        self.gateway = self._process("gateway", "web")
        self.worker = self._process("worker", "worker")
        self.dispatcher = self._process("dispatch", "dispatch")
        wait_http_ok(self.base_url + "/healthz", self.gateway)

    def _process(self, name: str, command: str) -> Process:
        return Process(name, ["-m", "gateway", command], self.env, self.workdir).start()

    def restart_worker_hard(self) -> None:
        self.worker.stop(signal.SIGKILL)
        self.worker = self._process("worker", "worker")

    def restart_dispatcher_hard(self) -> None:
        self.dispatcher.stop(signal.SIGKILL)
        self.dispatcher = self._process("dispatch", "dispatch")

    def flush_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis.url)
        try:
            client.flushdb()
        finally:
            client.close()

    def restart_gateway(self, down_for: float) -> None:
        self.gateway.stop()
        time.sleep(down_for)  # the outage itself is the point here
        self.restarted_at = dt.datetime.now(dt.UTC)
        self.gateway = self._process("gateway", "web")
        wait_http_ok(self.base_url + "/healthz", self.gateway)

    def stop(self) -> None:
        self.gateway.stop()
        self.worker.stop()
        self.dispatcher.stop()
        self.redis.stop()


def _key(stack: Stack) -> str:
    from gateway.auth.keys import _create_api_key, generate_api_key
    from tests.helpers import db_call

    key = generate_api_key()
    db_call(stack.database_url, lambda conn: _create_api_key(conn, "chaos", key), write=True)
    return key


def _trigger_all(
    stack: Stack, key: str, count: int, faults: dict[int, Callable[[], None]]
) -> list[str]:
    """Trigger ``count`` runs, retrying each (same idempotency key) through
    outages; call ``faults[i]`` just before run ``i``."""
    ids: list[str] = []
    headers = {"authorization": f"Bearer {key}"}
    rng = random.Random(7)
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=10) as client:
        for i in range(count):
            if i in faults:
                threading.Thread(target=faults[i], daemon=True).start()
            body = {"payload": {"seconds": round(rng.uniform(0, 0.3), 3)}}
            deadline = time.monotonic() + 60
            while True:
                try:
                    answer = client.post(
                        "/api/v1/tasks/sleep/trigger",
                        json=body,
                        headers={"idempotency-key": f"chaos-{i}"},
                    )
                    if answer.status_code in (200, 202):
                        ids.append(answer.json()["id"])
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"run {i} could not be triggered in 60 s")
                time.sleep(0.1)
    return ids


def _completed_since(database_url: str, since: dt.datetime) -> int:
    import sqlalchemy as sa

    from db.models import RunTransition
    from tests.helpers import db_call

    table = RunTransition.__table__  # type: ignore[attr-defined]
    query = (
        sa.select(sa.func.count())
        .select_from(table)
        .where(table.c.to_status == "COMPLETED", table.c.at >= since)
    )
    return int(db_call(database_url, lambda conn: conn.scalar(query)) or 0)


def run_chaos(
    count: int,
    database_url: str | None = None,
    *,
    workdir: Path | None = None,
    settle: float = 180.0,
) -> Summary:
    tmp = Path(workdir or tempfile.mkdtemp(prefix="chaos-"))
    database_url = database_url or f"sqlite+aiosqlite:///{tmp / 'chaos.db'}"
    upgrade(database_url)
    stack = Stack(tmp, database_url)
    receiver = Receiver().start()
    try:
        key = _key(stack)
        endpoint = httpx.post(
            stack.base_url + "/api/v1/webhooks",
            headers={"authorization": f"Bearer {key}"},
            json={"url": receiver.url("/chaos")},
        ).json()
        receiver.verify_with("/chaos", endpoint["secret"])

        def receiver_outage() -> None:
            receiver.stop()
            time.sleep(3)
            receiver.start()

        faults = {
            count * 2 // 10: stack.restart_worker_hard,
            count * 3 // 10: stack.restart_dispatcher_hard,
            count * 4 // 10: stack.flush_redis,
            count * 6 // 10: lambda: stack.restart_gateway(2.0),
            count * 7 // 10: receiver_outage,
        }
        started = time.monotonic()
        ids = _trigger_all(stack, key, count, faults)
        triggered = time.monotonic()

        deadline = time.monotonic() + settle
        final = 0
        while time.monotonic() < deadline:
            final = db_query(
                database_url,
                "SELECT COUNT(*) FROM runs WHERE status IN "
                "('COMPLETED','FAILED','CANCELED','EXPIRED','TIMED_OUT')",
            )[0][0]
            if final >= len(ids):
                break
            time.sleep(0.25)

        all_final = time.monotonic()

        def called_back() -> set[str]:
            return {
                c.json()["data"]["id"]
                for c in receiver.calls_to("/chaos")
                if c.verified_by
                and c.json()["type"].startswith("run.")
                and c.json()["data"]["status"] in FINAL
            }

        while time.monotonic() < deadline and not set(ids) <= called_back():
            time.sleep(0.25)
        all_called = time.monotonic()
        double = db_query(
            database_url,
            """
            SELECT COUNT(*) FROM (
              SELECT run_id FROM run_transitions
              WHERE to_status IN ('COMPLETED','FAILED','CANCELED','EXPIRED','TIMED_OUT')
              GROUP BY run_id HAVING COUNT(*) > 1) AS doubled""",
        )[0][0]
        message_ids: dict[str, set[str]] = defaultdict(set)
        for call in receiver.calls_to("/chaos"):
            event = call.json()
            message_ids[f"{event['data']['id']}:{event['type']}"].add(call.headers["webhook-id"])
        received = called_back() & set(ids)
        from prometheus_client.parser import text_string_to_metric_families

        scrape = httpx.get(stack.base_url + "/metrics").text
        completed = sum(
            sample.value
            for family in text_string_to_metric_families(scrape)
            for sample in family.samples
            if sample.name == "gateway_runs_total" and sample.labels.get("status") == "COMPLETED"
        )
        since = _completed_since(database_url, stack.restarted_at)
        return Summary(
            metrics_completed=completed,
            completed_since_restart=int(since),
            runs=len(ids),
            final=final,
            lost=len(ids) - final,
            double_final=int(double),
            callbacks_expected=len(ids),
            callbacks_received=len(received),
            unstable_ids=sum(1 for v in message_ids.values() if len(v) > 1),
            trigger_seconds=round(triggered - started, 1),
            final_seconds=round(all_final - triggered, 1),
            callback_seconds=round(all_called - all_final, 1),
        )
    finally:
        receiver.stop()
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=int, nargs="?", default=1000)
    parser.add_argument(
        "--postgres",
        metavar="SERVER_URL",
        help="run on a fresh database created on this PostgreSQL server",
    )
    args = parser.parse_args()
    database_url = None
    if args.postgres:
        from bench.databases import create_database, drop_database

        database_url = create_database(args.postgres)
    started = time.monotonic()
    try:
        summary = run_chaos(args.runs, database_url)
    finally:
        if args.postgres and database_url:
            drop_database(args.postgres, database_url)
    print(summary.line())
    print(
        f"(webhook-ids that changed between retries: {summary.unstable_ids}; "
        f"{time.monotonic() - started:.0f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
