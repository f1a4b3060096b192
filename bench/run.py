"""The gateway's tax on arq: every figure beside raw arq, measured in the same run.

    make bench        # or: .venv/bin/python bench/run.py [--rounds 3] [--runs 2000]
                      #       [--latency-runs 200] [--clients 64] [--web-concurrency 1]
                      #       [--workers-send]

Starts its own stack (an embedded Redis, a gateway, a worker and a callback
dispatcher as processes; `--workers-send`: no dispatcher, the workers send) on
SQLite, and on PostgreSQL too when ``BENCH_DATABASE_URL`` names a server (a
fresh database is made there and dropped after). Each round measures, with a
no-op ``echo`` task:

- raw arq on the same Redis: ``enqueue_job`` from one process with ``--clients``
  tasks, and a worker draining no-op jobs (``max_jobs=10``);
- Celery 5, the baseline most Python users would pick instead, on the same
  Redis: a worker of ``bench/celery_app.py`` (prefork, 2 processes, Redis
  result backend) running ``--runs`` no-op tasks sent while it drains, until
  every result is stored;
- trigger → final, and trigger → callback received, one run at a time, with
  where the callback's p50 goes (from the gateway's timestamps: the trigger
  written, the job taken and its start applied, the task and its final
  report applied, the callback received);
- triggers accepted with the worker paused (as raw ``enqueue_job`` is measured,
  with no worker draining), then the worker's drain of them, each with the
  CPU milliseconds per run of the web and worker processes;
- end to end without a callback: ``--clients`` connections trigger ``--runs``
  runs while the worker drains, then wait for each to be final; the trigger
  rate and the triggers' p50/p99 come from the same phase;
- end to end with a registered callback: the same load in a project with an
  endpoint, until a receiver on loopback has every ``run.completed`` call
  (lost and duplicated messages counted);
- the resident memory (RSS) of the web and worker processes.

It prints the medians of the rounds as a table and writes ``docs/bench.png``
(trigger → callback latency as a CDF, throughput per configuration),
``docs/bench.json`` (every round's figures) and ``docs/bench.md``, the
documentation's benchmark page: the table and each target met or not.
``--report-only`` writes that page again from ``docs/bench.json``. The load
client (``bench/httpload.py``) and the receiver (``bench/receiver.py``) are
lean asyncio code, so they are not what is measured. Figures only: nothing
here asserts a timing.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from arq import create_pool  # noqa: E402
from arq.connections import RedisSettings  # noqa: E402
from arq.worker import Worker  # noqa: E402

from bench.databases import create_database, drop_database  # noqa: E402
from bench.httpload import Connection, request_bytes, run_load  # noqa: E402
from bench.receiver import FastReceiver  # noqa: E402
from db.engine import Database  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from gateway.auth.keys import create_api_key  # noqa: E402
from gateway.cli.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from tests.helpers import Process, child_env, wait_http_ok  # noqa: E402

PHASES = ("raw", "celery", "latency", "accept", "e2e", "callbacks", "queue")
#: The queue the "queue" phase runs in: gated by a limit it never reaches, so
#: what it measures is what flow control costs (admission, the pump per start
#: and per end), not waiting for slots.
LIMITED_QUEUE = "bench-limited"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _family(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(c) for c in children)]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its children so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in _family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except OSError:
            pass
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (uvicorn's workers), in MB."""
    total = 0
    for p in _family(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# -- raw arq --------------------------------------------------------------------------


async def noop(ctx: dict[str, Any], n: int) -> int:
    return n


async def raw_arq(redis_url: str, runs: int, clients: int) -> tuple[float, float]:
    """(enqueue rate, drain rate) of raw arq for a no-op function."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name="bench:raw")
    await pool.flushdb()
    semaphore = asyncio.Semaphore(clients)

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


# -- Celery ----------------------------------------------------------------------------------


def celery(redis_url: str, runs: int, logs: Path) -> tuple[float, float]:
    """(send rate, end-to-end rate) of Celery 5 for a no-op task: a worker of
    ``bench/celery_app.py`` (prefork, 2 processes, Redis broker and result
    backend) is started and ready; then ``runs`` tasks are sent from this
    process while it drains them, until every result is stored."""
    import redis

    broker, backend = f"{redis_url}/2", f"{redis_url}/3"
    env = child_env(BENCH_CELERY_BROKER=broker, BENCH_CELERY_BACKEND=backend)
    from celery import Celery

    # A client app of its own for each run: an app keeps the broker connections
    # it made first, and the next backend's run has a Redis of its own.
    app = Celery("bench-client", broker=broker, backend=backend)
    with redis.Redis.from_url(broker) as r:
        r.flushdb()
    results = redis.Redis.from_url(backend)
    results.flushdb()
    worker = Process(
        "celery",
        [
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "2",
            "-Q",
            "bench",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
        ],
        env,
        logs,
    ).start()
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if time.monotonic() > deadline or not worker.alive:
                raise RuntimeError("the Celery worker did not answer: " + worker.log_tail())
        start = time.perf_counter()
        for n in range(runs):
            app.send_task("bench.noop", (n,), queue="bench")
        sent = time.perf_counter() - start
        while results.dbsize() < runs:
            time.sleep(0.002)
        drained = time.perf_counter() - start
    finally:
        worker.stop()
        results.close()
        app.close()
    return runs / sent, runs / drained


# -- the gateway ---------------------------------------------------------------------------


def _count_final(conn: Any, ids: list[str]) -> int:
    import sqlalchemy as sa

    from db.models import Run, RunStatus

    runs = Run.__table__  # type: ignore[attr-defined]
    final = [s.value for s in RunStatus if s.is_final]
    query = sa.select(sa.func.count()).where(runs.c.id.in_(ids), runs.c.status.in_(final))
    return int(conn.scalar(query))


class Bench:
    """One stack's addresses and the two projects the rounds use."""

    def __init__(
        self, port: int, plain_key: str, hooked_key: str, pids: dict[str, int], db: Database
    ) -> None:
        self.db = db
        self.pids = pids
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.plain_key = plain_key
        self.hooked_key = hooked_key

    def trigger(self, key: str, n: int, queue: str | None = None) -> bytes:
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        options = {"queue": queue} if queue else {}
        body = json.dumps({"payload": {"n": n}, "options": options}).encode()
        return request_bytes(
            "POST", "/api/v1/tasks/echo/trigger", host=self.host, headers=headers, body=body
        )

    def wait(self, key: str, run_id: str) -> bytes:
        headers = {"authorization": f"Bearer {key}"}
        return request_bytes(
            "GET", f"/api/v1/runs/{run_id}?wait=60", host=self.host, headers=headers
        )

    async def final_latency(self, runs: int, queue: str | None = None) -> list[float]:
        """Milliseconds from sending a trigger to the long-poll's final answer."""
        out = []
        async with Connection("127.0.0.1", self.port) as conn:
            for n in range(20 + runs):  # the first 20 warm up
                start = time.perf_counter()
                accepted = await conn.request(self.trigger(self.plain_key, n, queue))
                final = await conn.request(self.wait(self.plain_key, accepted.json()["id"]))
                assert final.json()["status"] == "COMPLETED", final.body
                if n >= 20:
                    out.append((time.perf_counter() - start) * 1000)
        return out

    async def callback_latency(
        self, receiver: FastReceiver, runs: int
    ) -> tuple[list[float], dict[str, float]]:
        """Milliseconds from sending a trigger to the receiver having the callback;
        and the p50 of each stage on the way (``stages``)."""
        out = []
        sent: dict[str, float] = {}
        async with Connection("127.0.0.1", self.port) as conn:
            for n in range(20 + runs):
                start = time.monotonic()
                accepted = await conn.request(self.trigger(self.hooked_key, n))
                run_id = accepted.json()["id"]
                arrived = await receiver.wait_for(run_id)
                if n >= 20:
                    out.append((arrived - start) * 1000)
                    sent[run_id] = start
        return out, await self.stages(receiver, sent)

    async def stages(self, receiver: FastReceiver, sent: dict[str, float]) -> dict[str, float]:
        """Where one run's trigger → callback time goes, p50 of each stage in ms,
        read off the gateway's timestamps (same host, same clock): the trigger
        until its row was written (``accept``), until the started report was
        applied (``pickup``), until the final report was applied (``task``), and
        until the receiver had the callback (``out``)."""
        import sqlalchemy as sa

        from db.models import Run

        runs = Run.__table__  # type: ignore[attr-defined]
        query = sa.select(
            runs.c.id, runs.c.created_at, runs.c.started_at, runs.c.finished_at
        ).where(runs.c.id.in_(list(sent)))
        rows = await self.db.read(lambda conn: conn.execute(query).all())
        wall = time.time() - time.monotonic()  # monotonic + wall = epoch seconds
        spans: dict[str, list[float]] = {"accept": [], "pickup": [], "task": [], "out": []}
        for run_id, created, started, finished in rows:
            marks = [
                sent[run_id] + wall,
                created.timestamp(),
                started.timestamp(),
                finished.timestamp(),
                receiver.arrived[run_id] + wall,
            ]
            for name, a, b in zip(spans, marks, marks[1:], strict=False):
                spans[name].append((b - a) * 1000)
        return {name: pct(values, 50) for name, values in spans.items() if values}

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def cpu_per_run(self, before: dict[str, float], runs: int, phase: str) -> dict[str, float]:
        """CPU milliseconds per run of each process since ``before``."""
        after = self.cpu()
        return {f"{phase}_cpu_{name}": (after[name] - before[name]) * 1000 / runs for name in after}

    async def accept_then_drain(self, runs: int, clients: int) -> dict[str, float]:
        """``runs`` triggers with the worker paused (SIGSTOP), as raw arq's
        enqueue is measured with no worker draining; then the worker resumes
        and drains them. Each phase's rate and web CPU per run."""
        import signal

        cpu = self.cpu()
        os.kill(self.pids["worker"], signal.SIGSTOP)
        try:
            accepted = await run_load(
                "127.0.0.1",
                self.port,
                [self.trigger(self.plain_key, n) for n in range(runs)],
                connections=clients,
            )
        finally:
            os.kill(self.pids["worker"], signal.SIGCONT)
        assert all(a.status == 202 for a in accepted.answers), accepted.answers[0]
        figures = {
            "accept_rate": accepted.rate,
            "accept_p50_ms": pct(accepted.latencies, 50) * 1000,
            "accept_p99_ms": pct(accepted.latencies, 99) * 1000,
            **self.cpu_per_run(cpu, runs, "accept"),
        }
        # Drained: every run final, as the database says (no client waits on
        # the gateway meanwhile, so its CPU is the workers' reports alone).
        cpu = self.cpu()
        start = time.perf_counter()
        ids = [a.json()["id"] for a in accepted.answers]
        while await self.db.read(_count_final, ids) < len(ids):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # polling the database: the gateway is not asked
        figures["drain_rate"] = runs / (time.perf_counter() - start)
        figures.update(self.cpu_per_run(cpu, runs, "drain"))
        return figures

    async def end_to_end(
        self, runs: int, clients: int, queue: str | None = None
    ) -> dict[str, float]:
        """``runs`` triggers from ``clients`` connections, then each waited for."""
        cpu = self.cpu()
        start = time.perf_counter()
        triggered = await run_load(
            "127.0.0.1",
            self.port,
            [self.trigger(self.plain_key, n, queue) for n in range(runs)],
            connections=clients,
        )
        assert all(a.status == 202 for a in triggered.answers), triggered.answers[0]
        ids = [a.json()["id"] for a in triggered.answers]
        finals = await run_load(
            "127.0.0.1", self.port, [self.wait(self.plain_key, i) for i in ids], connections=clients
        )
        elapsed = time.perf_counter() - start
        assert all(a.json()["status"] == "COMPLETED" for a in finals.answers)
        return {
            "trigger_rate": triggered.rate,
            "trigger_p50_ms": pct(triggered.latencies, 50) * 1000,
            "trigger_p99_ms": pct(triggered.latencies, 99) * 1000,
            "e2e_rate": runs / elapsed,
            **self.cpu_per_run(cpu, runs, "e2e"),
        }

    async def end_to_end_callbacks(
        self, receiver: FastReceiver, runs: int, clients: int
    ) -> dict[str, float]:
        """``runs`` triggers from ``clients`` connections in the project with an
        endpoint, until the receiver has every run's callback."""
        before = set(receiver.arrived)
        receiver.expect(len(before) + runs)
        cpu = self.cpu()
        start = time.monotonic()
        triggered = await run_load(
            "127.0.0.1",
            self.port,
            [self.trigger(self.hooked_key, n) for n in range(runs)],
            connections=clients,
        )
        ids = {a.json()["id"] for a in triggered.answers}
        try:
            await receiver.wait_all(within=300)
        except TimeoutError:
            pass
        got = {r: t for r, t in receiver.arrived.items() if r in ids}
        last = max(got.values()) if got else time.monotonic()
        return {
            "cb_rate": len(got) / (last - start),
            "cb_lost": float(len(ids) - len(got)),
            **self.cpu_per_run(cpu, runs, "cb"),
        }


async def one_round(
    bench: Bench, receiver: FastReceiver, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if "raw" in args.phases:
        figures["raw_enqueue"], figures["raw_drain"] = await raw_arq(
            redis_url, args.runs, args.clients
        )
    if "celery" in args.phases:
        figures["celery_send"], figures["celery_e2e"] = await asyncio.to_thread(
            celery, redis_url.rsplit("/", 1)[0], args.runs, args.logs or Path(tempfile.gettempdir())
        )
    if "latency" in args.phases:
        finals = await bench.final_latency(args.latency_runs)
        callbacks, stages = await bench.callback_latency(receiver, args.latency_runs)
        figures.update(
            final_p50=pct(finals, 50),
            final_p99=pct(finals, 99),
            cb_p50=pct(callbacks, 50),
            cb_p99=pct(callbacks, 99),
            callbacks=callbacks,
            **{f"cb_stage_{name}": ms for name, ms in stages.items()},
        )
    if "accept" in args.phases:
        figures.update(await bench.accept_then_drain(args.runs, args.clients))
    if "e2e" in args.phases:
        figures.update(await bench.end_to_end(args.runs, args.clients))
    if "callbacks" in args.phases:
        figures.update(await bench.end_to_end_callbacks(receiver, args.runs, args.clients))
    if "queue" in args.phases:
        queued = await bench.end_to_end(args.runs, args.clients, LIMITED_QUEUE)
        finals = await bench.final_latency(args.latency_runs, LIMITED_QUEUE)
        figures.update(
            q_e2e_rate=queued["e2e_rate"],
            q_trigger_rate=queued["trigger_rate"],
            q_e2e_cpu_web=queued["e2e_cpu_web"],
            q_final_p50=pct(finals, 50),
            q_final_p99=pct(finals, 99),
        )
    return figures


# -- a stack per database ------------------------------------------------------------------


def measure(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start a stack on ``backend``; the rounds' figures, and the processes' RSS."""
    server = os.environ.get("BENCH_DATABASE_URL", "")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'bench.db'}"
        if backend == "postgresql":
            database_url = create_database(server)
        upgrade(database_url)
        redis = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
        port = free_port()
        env = child_env(
            DATABASE_URL=database_url,
            REDIS_URL=redis.url + "/0",
            GATEWAY_SECRET_KEY="bench-secret-0123456789",
            PORT=str(port),
            LOG_LEVEL=args.log_level,
            WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
            WEB_CONCURRENCY=str(args.web_concurrency),
            **(
                {"WORKER_CONCURRENCY": str(args.worker_concurrency)}
                if args.worker_concurrency
                else {}
            ),
            DATA_DIR=str(tmp_path / "data"),
            WEBHOOK_DISPATCHER="false" if args.workers_send else "true",
        )
        logs = args.logs or tmp_path
        logs.mkdir(parents=True, exist_ok=True)
        gateway = Process("gateway", ["-m", "gateway", "web"], env, logs).start()
        # With --split-web, the workers report to a web process of their own:
        # the public API's never runs a report.
        reports_port = free_port()
        reports = (
            Process(
                "gateway-reports",
                ["-m", "gateway", "web"],
                {**env, "PORT": str(reports_port)},
                logs,
            ).start()
            if args.split_web
            else None
        )
        worker_env = (
            {**env, "GATEWAY_URL": f"http://127.0.0.1:{reports_port}"} if args.split_web else env
        )
        worker = Process("worker", ["-m", "gateway", "worker"], worker_env, logs).start()
        dispatcher = (
            Process("dispatch", ["-m", "gateway", "dispatch"], env, logs).start()
            if not args.workers_send
            else None
        )
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/healthz", gateway)
            if reports is not None:
                wait_http_ok(f"http://127.0.0.1:{reports_port}/healthz", reports)

            async def key(name: str) -> str:
                db = Database(database_url)
                try:
                    return (await create_api_key(db, f"bench-{name}-{time.time_ns()}"))[1]
                finally:
                    await db.dispose()

            plain, hooked = asyncio.run(key("plain")), asyncio.run(key("hooked"))
            assert gateway.popen is not None and worker.popen is not None
            worker_rss_start = rss_mb(worker.popen.pid)

            async def rounds() -> list[dict[str, Any]]:
                receiver = await FastReceiver().start()
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    headers={"authorization": f"Bearer {hooked}"},
                ) as client:
                    answer = await client.post(
                        "/api/v1/webhooks",
                        json={"url": receiver.url(), "events": ["run.completed"]},
                    )
                    receiver.secret = answer.json()["secret"]
                    made = await client.post(
                        "/api/v1/queues",
                        json={"name": LIMITED_QUEUE, "concurrency_limit": 10_000},
                        headers={"authorization": f"Bearer {plain}"},
                    )
                    assert made.status_code == 201, made.text
                bench = Bench(
                    port,
                    plain,
                    hooked,
                    {
                        "web": gateway.popen.pid,
                        "worker": worker.popen.pid,
                        **(
                            {"dispatch": dispatcher.popen.pid}
                            if dispatcher is not None and dispatcher.popen is not None
                            else {}
                        ),
                        **(
                            {"reports": reports.popen.pid}
                            if reports is not None and reports.popen is not None
                            else {}
                        ),
                    },
                    Database(database_url),
                )
                out = []
                try:
                    for n in range(args.rounds):
                        figures = await one_round(bench, receiver, redis.url + "/1", args)
                        print(f"  {backend} round {n + 1}: " + _brief(figures), flush=True)
                        if args.phases != PHASES:  # a partial run: figures, no table
                            print({k: v for k, v in figures.items() if k != "callbacks"})
                        out.append(figures)
                    duplicates = sum(1 for c in receiver.webhook_ids.values() if c > 1)
                    out[-1]["cb_duplicated"] = duplicates
                    out[-1]["bad_signatures"] = receiver.bad_signatures
                finally:
                    await receiver.stop()
                    await bench.db.dispose()
                return out

            results = asyncio.run(rounds())
            runs_done = args.rounds * (4 * args.runs + 3 * (20 + args.latency_runs))
            return {
                "rounds": results,
                "web_rss": rss_mb(gateway.popen.pid),
                "worker_rss": (worker_rss_start, rss_mb(worker.popen.pid)),
                "runs_done": runs_done,
            }
        finally:
            gateway.stop()
            worker.stop()
            if dispatcher is not None:
                dispatcher.stop()
            if reports is not None:
                reports.stop()
            redis.stop()
            if backend == "postgresql":
                drop_database(server, database_url)


def _brief(f: dict[str, Any]) -> str:
    if not {"accept_rate", "raw_enqueue", "cb_rate", "cb_p50", "celery_e2e"} <= set(f):
        return "(some phases only)"
    return (
        f"accepted {f['accept_rate']:.0f}/s ({f['accept_rate'] / f['raw_enqueue']:.2f}x), "
        f"e2e {f['e2e_rate']:.0f}/s, e2e+callback {f['cb_rate']:.0f}/s "
        f"({f['cb_rate'] / f['raw_drain']:.2f}x raw arq, "
        f"{f['cb_rate'] / f['celery_e2e']:.2f}x Celery's {f['celery_e2e']:.0f}/s), "
        f"trigger p99 {f['trigger_p99_ms']:.0f} ms, callback p50 {f['cb_p50']:.1f} ms; "
        f"CPU/run with callback: web {f['cb_cpu_web']:.1f} ms, worker {f['cb_cpu_worker']:.1f} ms"
        + (f", dispatch {f['cb_cpu_dispatch']:.1f} ms" if "cb_cpu_dispatch" in f else "")
        + (f", reports web {f['cb_cpu_reports']:.1f} ms" if "cb_cpu_reports" in f else "")
    )


# -- report ---------------------------------------------------------------------------


def median(rounds: list[dict[str, Any]], name: str) -> float:
    return float(statistics.median(r[name] for r in rounds))


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    backends = list(results)

    def cells(render: Any) -> str:
        return " | ".join(render(results[b]["rounds"], results[b]) for b in backends)

    def ratio(rounds: list[dict[str, Any]], name: str, raw: str) -> str:
        value, base = median(rounds, name), median(rounds, raw)
        return f"{value:.0f}/s ({value / base:.2f} of raw {base:.0f}/s)"

    rows = [
        "| figure | " + " | ".join(backends) + " |",
        "| --- | " + " | ".join("---" for _ in backends) + " |",
        "| triggers accepted (202), the worker paused (as raw enqueue_job is measured) | "
        + cells(lambda r, _: ratio(r, "accept_rate", "raw_enqueue"))
        + " |",
        "| triggers accepted while the worker drains | "
        + cells(lambda r, _: ratio(r, "trigger_rate", "raw_enqueue"))
        + " |",
        "| trigger p50 / p99 while the worker drains | "
        + cells(
            lambda r, _: f"{median(r, 'trigger_p50_ms'):.1f} / {median(r, 'trigger_p99_ms'):.1f} ms"
        )
        + " |",
        "| trigger → final, one at a time, p50 / p99 | "
        + cells(lambda r, _: f"{median(r, 'final_p50'):.1f} / {median(r, 'final_p99'):.1f} ms")
        + " |",
        "| trigger → callback received, one at a time, p50 / p99 | "
        + cells(lambda r, _: f"{median(r, 'cb_p50'):.1f} / {median(r, 'cb_p99'):.1f} ms")
        + " |",
        "| where that p50 goes: trigger written, job taken and started, task and final "
        "report, callback out | "
        + cells(
            lambda r, _: (
                " + ".join(
                    f"{median(r, f'cb_stage_{name}'):.1f}"
                    for name in ("accept", "pickup", "task", "out")
                )
                + " ms"
                if "cb_stage_out" in r[0]
                else "(not measured)"
            )
        )
        + " |",
        "| end to end, no callback | "
        + cells(lambda r, _: ratio(r, "e2e_rate", "raw_drain"))
        + " |",
        f"| end to end with a registered callback, {args.clients} clients | "
        + cells(lambda r, _: ratio(r, "cb_rate", "raw_drain"))
        + " |",
        "| the same, against Celery 5 running no-op tasks (prefork, 2 processes, Redis "
        "result backend), sent and drained | "
        + cells(
            lambda r, _: (
                f"{median(r, 'cb_rate') / median(r, 'celery_e2e'):.2f} of Celery's "
                f"{median(r, 'celery_e2e'):.0f}/s"
            )
        )
        + " |",
        "| end to end in a queue with a limit it never reaches (what flow control costs) | "
        + cells(
            lambda r, _: (
                f"{median(r, 'q_e2e_rate'):.0f}/s "
                f"({median(r, 'q_e2e_rate') / median(r, 'e2e_rate'):.2f} of the run without)"
            )
        )
        + " |",
        "| trigger → final in that queue, one at a time, p50 / p99 | "
        + cells(lambda r, _: f"{median(r, 'q_final_p50'):.1f} / {median(r, 'q_final_p99'):.1f} ms")
        + " |",
        "| web CPU per run end to end, without / in that queue | "
        + cells(
            lambda r, _: f"{median(r, 'e2e_cpu_web'):.2f} / {median(r, 'q_e2e_cpu_web'):.2f} ms"
        )
        + " |",
        "| CPU per run: accepting (web); draining (web, worker) | "
        + cells(
            lambda r, _: (
                f"{median(r, 'accept_cpu_web'):.2f} ms; "
                f"{median(r, 'drain_cpu_web'):.2f}, {median(r, 'drain_cpu_worker'):.2f} ms"
            )
        )
        + " |",
        "| CPU per run, end to end without / with a callback: web, worker | "
        + cells(
            lambda r, _: (
                f"{median(r, 'e2e_cpu_web'):.1f}, {median(r, 'e2e_cpu_worker'):.1f} / "
                f"{median(r, 'cb_cpu_web'):.1f}, {median(r, 'cb_cpu_worker'):.1f} ms"
            )
        )
        + " |",
        "| callbacks lost / duplicated (all rounds) | "
        + cells(lambda r, _: f"{sum(int(x['cb_lost']) for x in r)} / {int(r[-1]['cb_duplicated'])}")
        + " |",
        "| web RSS at the end; worker RSS start → end | "
        + cells(
            lambda _, res: (
                f"{res['web_rss']:.0f} MB after {res['runs_done']} runs; "
                f"{res['worker_rss'][0]:.0f} → {res['worker_rss'][1]:.0f} MB"
            )
        )
        + " |",
    ]
    return "\n".join(rows)


#: The speed targets the page checks: (what, backend or None for both, figure, test).
TARGETS: tuple[tuple[str, str | None, Any, Any], ...] = (
    (
        "triggers accepted ≥ 0.5 of raw enqueue_job",
        "sqlite",
        lambda r: median(r, "accept_rate") / median(r, "raw_enqueue"),
        lambda v: v >= 0.5,
    ),
    (
        "triggers accepted ≥ 0.4 of raw enqueue_job",
        "postgresql",
        lambda r: median(r, "accept_rate") / median(r, "raw_enqueue"),
        lambda v: v >= 0.4,
    ),
    (
        "end to end with a callback ≥ 0.3 of raw arq's drain",
        None,
        lambda r: median(r, "cb_rate") / median(r, "raw_drain"),
        lambda v: v >= 0.3,
    ),
    (
        "end to end with a callback ≥ 1.0 of Celery's no-op tasks",
        None,
        lambda r: median(r, "cb_rate") / median(r, "celery_e2e"),
        lambda v: v >= 1.0,
    ),
    (
        "trigger p99 ≤ 100 ms while the worker drains",
        None,
        lambda r: median(r, "trigger_p99_ms"),
        lambda v: v <= 100,
    ),
    (
        "trigger → callback p50 ≤ 12 ms",
        "sqlite",
        lambda r: median(r, "cb_p50"),
        lambda v: v <= 12,
    ),
    (
        "trigger → callback p50 ≤ 15 ms",
        "postgresql",
        lambda r: median(r, "cb_p50"),
        lambda v: v <= 15,
    ),
    ("trigger → callback p99 ≤ 30 ms", None, lambda r: median(r, "cb_p99"), lambda v: v <= 30),
    (
        "no callback lost",
        None,
        lambda r: sum(int(x["cb_lost"]) for x in r),
        lambda v: v == 0,
    ),
)


def report(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The documentation's benchmark page (``docs/bench.md``)."""
    clients = argparse.Namespace(clients=meta["clients"])
    lines = [
        "# Benchmarks",
        "",
        "<!-- Written by `make bench` (bench/run.py); edits here are overwritten. -->",
        "",
        f"Measured on {meta['date']} by `{meta['command']}` on {meta['cores']} cores shared",
        "by the load client, the gateway, the worker, Redis, the database and the receiver.",
        f"Medians of {meta['rounds']} rounds of {meta['runs']} runs per load phase and",
        f"{meta['latency_runs']} runs one at a time; raw arq is measured in the same run,",
        "on the same Redis. The [performance notes](performance.md) say what the figures",
        "come from.",
        "",
        table(results, clients),
        "",
        "![Trigger → callback latency and throughput beside raw arq](bench.png)",
        "",
        "## Against the targets",
        "",
        "| target | " + " | ".join(results) + " |",
        "| --- | " + " | ".join("---" for _ in results) + " |",
    ]
    for what, only, figure, met in TARGETS:
        cells = []
        for backend, result in results.items():
            if only is not None and backend != only:
                cells.append("")
                continue
            value = figure(result["rounds"])
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            cells.append(f"{shown}: {'met' if met(value) else '**not met**'}")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _no_samples(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k != "callbacks"}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend, result in results.items():
        samples = sorted(s for r in result["rounds"] for s in r["callbacks"])
        cdf.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], label=backend)
    cdf.set_xlabel("trigger → callback received (ms), one run at a time")
    cdf.set_ylabel("fraction of runs")
    tails = [
        pct([s for r in result["rounds"] for s in r["callbacks"]], 99.5)
        for result in results.values()
    ]
    cdf.set_xlim(0, max(tails) * 1.3)
    cdf.grid(alpha=0.3)
    cdf.legend()
    labels = [
        "raw arq\nenqueue",
        "triggers\naccepted",
        "raw arq\ndrain",
        "end to end",
        "end to end\n+ callback",
    ]
    names = ["raw_enqueue", "accept_rate", "raw_drain", "e2e_rate", "cb_rate"]
    width = 0.8 / len(results)
    for i, (backend, result) in enumerate(results.items()):
        values = [median(result["rounds"], n) for n in names]
        bars.bar([x + i * width for x in range(len(names))], values, width, label=backend)
    bars.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(names))], labels)
    bars.set_ylabel("runs (or jobs) per second")
    bars.grid(axis="y", alpha=0.3)
    bars.legend()
    fig.suptitle(f"webhook-job-gateway beside raw arq, medians ({os.cpu_count()} cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--web-concurrency", type=int, default=1)
    parser.add_argument(
        "--worker-concurrency", type=int, default=0, help="WORKER_CONCURRENCY (0: its default)"
    )
    parser.add_argument("--only", choices=["sqlite", "postgresql"], default=None)
    parser.add_argument(
        "--split-web",
        action="store_true",
        help="the workers report to a second web process, apart from the public API's",
    )
    parser.add_argument(
        "--workers-send",
        action="store_true",
        help="callbacks sent by the workers (WEBHOOK_DISPATCHER=false), not `gateway dispatch`",
    )
    parser.add_argument(
        "--plot",
        type=lambda v: Path(v) if v else None,
        default=ROOT / "docs" / "bench.png",
        help="where to write the figure (empty: none)",
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep the processes' logs here")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--phases",
        type=lambda v: tuple(v.split(",")),
        default=PHASES,
        help="comma-separated, of " + ",".join(PHASES) + " (the table needs all)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write docs/bench.md again from docs/bench.json, measuring nothing",
    )
    args = parser.parse_args()
    page = ROOT / "docs" / "bench.md"
    if args.report_only:
        saved = json.loads((ROOT / "docs" / "bench.json").read_text())
        meta = saved.pop("meta")
        page.write_text(report(saved, meta))
        print(f"wrote {page.relative_to(ROOT)}")
        return
    backends = ["sqlite", "postgresql"] if os.environ.get("BENCH_DATABASE_URL") else ["sqlite"]
    if args.only:
        backends = [args.only]
    results = {backend: measure(backend, args) for backend in backends}
    if args.phases != PHASES:
        return
    print()
    print(
        f"medians of {args.rounds} rounds; {args.runs} runs per load phase, "
        f"{args.latency_runs} one at a time; {os.cpu_count()} cores shared by the client, "
        f"gateway ({args.web_concurrency} process(es)), worker, Redis and the database"
    )
    print()
    print(table(results, args))
    if args.plot:
        plot(results, args.plot)
        figures = {
            backend: {**result, "rounds": [_no_samples(r) for r in result["rounds"]]}
            for backend, result in results.items()
        }
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(
                ["make bench"]
                + (["BENCH_DATABASE_URL=…"] if "postgresql" in results else [])
                + ([f'BENCH_ARGS="{" ".join(sys.argv[1:])}"'] if sys.argv[1:] else [])
            ),
            "cores": os.cpu_count(),
            "rounds": args.rounds,
            "runs": args.runs,
            "latency_runs": args.latency_runs,
            "clients": args.clients,
        }
        args.plot.with_suffix(".json").write_text(
            json.dumps({"meta": meta, **figures}, indent=1) + "\n"
        )
        shown = args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot
        print(f"\nwrote {shown}")
        if args.plot == ROOT / "docs" / "bench.png":
            page.write_text(report(figures, meta))
            print(f"wrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
