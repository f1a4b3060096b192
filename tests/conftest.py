"""Fixtures: a real Redis, a real database, and the gateway and worker as processes.

Every test that takes ``stack`` runs once per database backend: SQLite always,
and PostgreSQL too when ``TEST_DATABASE_URL`` is set (``.ci/run`` sets it when a
server answers). Each backend gets a database of its own, created here and
dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
import sqlalchemy as sa

from db.migrate import upgrade
from gateway.cli.embedded_redis import EmbeddedRedis, free_port
from gateway.settings import normalize_database_url
from jobs.protocol import nudge_channel, redis_database
from tests.gemini import GeminiStandIn
from tests.helpers import Process, child_env, db_call, db_query, wait_http_ok, wait_until
from tests.receiver import Receiver

T = TypeVar("T")

TEST_SECRET = "test-secret-" + secrets.token_urlsafe(16)
RETRY_SCHEDULE = "0,0.3,0.6,1,1.5,2"
DISABLE_AFTER = 12.0


def _backends() -> list[str]:
    return ["sqlite", "postgresql"] if os.environ.get("TEST_DATABASE_URL") else ["sqlite"]


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1 that verifies calls with `standardwebhooks`."""
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


def _off_loop(fn: Callable[[], T]) -> T:
    """``fn()``, in another thread if this one runs an event loop (Playwright's
    sync API keeps one, and a session fixture made during a browser test must
    still run ``asyncio.run``: the admin statements, Alembic's migrations)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    parsed = sa.make_url(url).set(drivername="postgresql")
    conn = await asyncpg.connect(parsed.render_as_string(hide_password=False))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


class Databases:
    """Fresh, migrated databases of one backend, dropped at the end.

    Every stack gets one of its own: stacks with their own Redis must not
    share a database, or one stack's reconciler would queue another's runs.
    """

    def __init__(self, backend: str, tmp: pytest.TempPathFactory) -> None:
        self.backend = backend
        self.tmp = tmp
        self.created: list[str] = []
        self.server_url = normalize_database_url(os.environ.get("TEST_DATABASE_URL", ""))

    def new(self, label: str) -> str:
        url = self.empty(label)
        _off_loop(lambda: upgrade(url))
        return url

    def empty(self, label: str) -> str:
        """A database of this backend that nobody migrated."""
        if self.backend == "sqlite":
            url = f"sqlite+aiosqlite:///{self.tmp.mktemp('db') / f'{label}.db'}"
        else:
            name = f"gw_test_{label}_{secrets.token_hex(4)}"
            _off_loop(lambda: asyncio.run(_admin(self.server_url, f'CREATE DATABASE "{name}"')))
            self.created.append(name)
            url = (
                sa.make_url(self.server_url)
                .set(database=name)
                .render_as_string(hide_password=False)
            )
        return url

    def drop_all(self) -> None:
        statements = [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in self.created]

        def drop() -> None:
            for statement in statements:
                asyncio.run(_admin(self.server_url, statement))

        _off_loop(drop)


@pytest.fixture(scope="session", params=_backends())
def databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Databases]:
    made = Databases(request.param, tmp_path_factory)
    try:
        yield made
    finally:
        made.drop_all()


@pytest.fixture(scope="session")
def database_url(databases: Databases) -> str:
    """The main stack's migrated database, of each backend."""
    return databases.new("main")


@dataclasses.dataclass
class Stack:
    """A gateway, a worker and (unless ``WEBHOOK_DISPATCHER`` is off) a
    callback dispatcher, as separate processes, over one Redis and one database."""

    database_url: str
    redis_url: str
    base_url: str
    env: dict[str, str]
    gateway: Process
    worker: Process
    api_key: str
    project_id: str
    dispatcher: Process | None = None

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {key or self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=70.0)

    def new_key(self, project: str) -> str:
        from gateway.auth.keys import _create_api_key, generate_api_key

        key = generate_api_key()
        db_call(self.database_url, lambda conn: _create_api_key(conn, project, key), write=True)
        return key

    def query(self, sql: str, **params: Any) -> list[Any]:
        return db_query(self.database_url, sql, params)

    def start_gateway(self) -> None:
        self.gateway = Process(
            "gateway", ["-m", "gateway", "web"], self.env, self.gateway.log_path.parent
        ).start()
        wait_http_ok(self.base_url + "/healthz", self.gateway)

    def start_worker(self) -> None:
        self.worker = Process(
            "worker", ["-m", "gateway", "worker"], self.env, self.worker.log_path.parent
        ).start()

    def workers_listening(self, count: int = 1) -> float:
        """Wait until ``count`` workers listen for the queue's nudges (each
        subscribes once it is ready to poll); when that was (``time.time()``)."""
        with redis.Redis.from_url(self.redis_url) as client:
            channel = nudge_channel("gateway:queue", redis_database(client))
            wait_until(
                lambda: client.pubsub_numsub(channel)[0][1] >= count,
                timeout=60,
                what=f"{count} worker(s) listening",
            )
        return time.time()

    def start_dispatcher(self) -> None:
        """Start ``gateway dispatch``, when callbacks leave from one."""
        if dispatches(self.env):
            self.dispatcher = Process(
                "dispatch", ["-m", "gateway", "dispatch"], self.env, self.worker.log_path.parent
            ).start()

    def stop(self) -> None:
        for process in (self.gateway, self.worker, self.dispatcher):
            if process is not None:
                process.stop()

    def run(
        self, task: str, payload: Any = None, *, key: str | None = None, **options: Any
    ) -> dict[str, Any]:
        """Trigger ``task`` and wait for it to be final."""
        with self.client(key) as client:
            response = client.post(
                f"/api/v1/tasks/{task}/trigger", json={"payload": payload, "options": options}
            )
            assert response.status_code == 202, response.text
            run_id = response.json()["id"]
            final = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
        assert final["is_final"], final
        return dict(final)


def dispatches(env: dict[str, str]) -> bool:
    """Whether callbacks leave from ``gateway dispatch`` with these settings
    (``WEBHOOK_DISPATCHER``, on unless set off)."""
    return env.get("WEBHOOK_DISPATCHER", "true").strip().lower() not in ("false", "0", "no", "off")


@contextlib.contextmanager
def launch_stack(
    name: str,
    database_url: str,
    redis_url: str,
    logs: Path,
    worker_env: dict[str, str] | None = None,
    **env_overrides: str,
) -> Iterator[Stack]:
    """A gateway and a worker as processes, with the tests' settings
    (``worker_env``: settings of the worker alone)."""
    port = free_port()
    settings = dict(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        GATEWAY_SECRET_KEY=TEST_SECRET,
        PORT=str(port),
        GATEWAY_URL=f"http://127.0.0.1:{port}",
        TASK_MODULES="tests.tasks",
        WORKER_CONCURRENCY="20",
        MAX_OUTPUT_BYTES="65536",
        LOG_LEVEL="INFO",
        # Callbacks and image downloads: the test servers live on 127.0.0.1,
        # and the retry schedule is compressed from hours to seconds.
        WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
        WEBHOOK_RETRY_SCHEDULE=RETRY_SCHEDULE,
        WEBHOOK_TIMEOUT="2",
        WEBHOOK_DISABLE_AFTER=str(DISABLE_AFTER),
        RECONCILE_INTERVAL="0.5",
        RECONCILE_GRACE="2",
        CORS_ORIGINS="http://app.example",
        ARTIFACT_DIR=str(logs / "artifacts"),
        IMAGE_MAX_BYTES=str(2_000_000),
        IMAGE_MAX_PIXELS=str(4_000_000),
        LLM_MAX_RETRIES="2",
        RUN_LOG_MAX_LINES="150",
        # Three pytest processes run PostgreSQL stacks side by side: each
        # keeps few connections, well within a default max_connections (100).
        DATABASE_POOL_SIZE="4",
    )
    env = child_env(**{**settings, **env_overrides})
    gateway = Process("gateway", ["-m", "gateway", "web"], env, logs).start()
    worker = Process("worker", ["-m", "gateway", "worker"], {**env, **(worker_env or {})}, logs)
    worker.start()
    stack = Stack(
        database_url=database_url,
        redis_url=redis_url,
        base_url=f"http://127.0.0.1:{port}",
        env=env,
        gateway=gateway,
        worker=worker,
        api_key="",
        project_id="",
    )
    try:
        stack.start_dispatcher()
        wait_http_ok(stack.base_url + "/healthz", gateway)
        project = f"tests-{name}-{secrets.token_hex(3)}"
        stack.api_key = stack.new_key(project)
        stack.project_id = stack.query("SELECT id FROM projects WHERE name = :n", n=project)[0][0]
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def gemini() -> Iterator[GeminiStandIn]:
    """A stand-in for the Gemini API that the real google-genai SDK talks to."""
    server = GeminiStandIn().start()
    yield server
    server.stop()


def _redis_db(database_url: str, offset: int) -> int:
    # Each backend and each stack gets its own Redis database: queues never mix.
    # Offsets: 0 main, 1 single-slot, 2 faults, 3 fuzz, 4 queue, 5 strict, 6 web2,
    # 7 operate, 8 artifacts, 9 flow, 10 faults (2nd), 11 webhooks, 12 durable,
    # 13 rotation, 14 workers, 15 backup, 16 restored backup, 17-18 connections, 19 traces,
    # 20 dispatcher, 21 callbacks from workers (64 databases: 30 at most).
    return 1 + offset * 2 + _backends().index(_backend_of(database_url))


@pytest.fixture(scope="session")
def stack(
    database_url: str,
    redis_server: EmbeddedRedis,
    gemini: GeminiStandIn,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The shared stack: a worker with 20 slots."""
    with launch_stack(
        "main",
        database_url,
        f"{redis_server.url}/{_redis_db(database_url, 0)}",
        tmp_path_factory.mktemp("logs"),
        GEMINI_API_KEY="stand-in-key",
        GEMINI_BASE_URL=gemini.url,
    ) as stack:
        yield stack


@pytest.fixture(scope="session")
def single_slot_stack(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    gemini: GeminiStandIn,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A stack whose worker runs one job at a time (arq ``max_jobs=1``)."""
    with launch_stack(
        "single",
        databases.new("single"),
        f"{redis_server.url}/{_redis_db(database_url, 1)}",
        tmp_path_factory.mktemp("logs-single"),
        WORKER_CONCURRENCY="1",
        GEMINI_API_KEY="stand-in-key",
        GEMINI_BASE_URL=gemini.url,
    ) as stack:
        yield stack


def _backend_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


@pytest.fixture(scope="session")
def flow(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    gemini: GeminiStandIn,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """Two gateway processes (``WEB_CONCURRENCY=2``) and three workers (20
    slots each) over one Redis and one database: a limit must hold across all."""
    logs = tmp_path_factory.mktemp("logs-flow")
    with launch_stack(
        "flow",
        databases.new("flow"),
        f"{redis_server.url}/{_redis_db(database_url, 9)}",
        logs,
        WEB_CONCURRENCY="2",
    ) as stack:
        more = [
            Process(f"worker{i}", ["-m", "gateway", "worker"], stack.env, logs).start()
            for i in (2, 3)
        ]
        try:
            # All three take jobs from the first trigger on: each listens for
            # the queue's nudges once it is ready to poll.
            stack.workers_listening(3)
            yield stack
        finally:
            for worker in more:
                worker.stop()
