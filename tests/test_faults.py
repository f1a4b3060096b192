"""Faults: a worker killed or stopped mid-run. Marked ``faults`` (``pytest -m faults``)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, _backend_of, _backends, _redis_db, launch_stack
from tests.helpers import wait_until

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def fault_stack(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A stack of its own, with short heartbeats, so killing its worker
    disturbs no other test."""
    with launch_stack(
        "faults",
        databases.new("faults"),
        f"{redis_server.url}/{_redis_db(database_url, 2)}",
        tmp_path_factory.mktemp("logs-faults"),
        HEARTBEAT_INTERVAL="0.3",
        LOG_FORMAT="json",
        HEARTBEAT_TIMEOUT="2",
        WORKER_SHUTDOWN_GRACE="2",
    ) as stack:
        yield stack


def transitions(stack: Stack, run_id: str) -> list[str]:
    return [
        r[0]
        for r in stack.query(
            "SELECT to_status FROM run_transitions WHERE run_id = :id ORDER BY id", id=run_id
        )
    ]


def test_runs_of_a_killed_worker_run_again_and_end_final(fault_stack: Stack) -> None:
    stack = fault_stack
    with stack.client() as client:
        ids = [
            client.post("/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 1.5}}).json()[
                "id"
            ]
            for _ in range(8)
        ]
        wait_until(
            lambda: all(
                client.get(f"/api/v1/runs/{i}").json()["status"] == "EXECUTING" for i in ids
            ),
            what="every run to start",
        )
        stack.worker.stop(signal.SIGKILL)
        stack.start_worker()
        finals = [client.get(f"/api/v1/runs/{i}", params={"wait": 30}).json() for i in ids]
    for run in finals:
        assert run["status"] == "COMPLETED", run
        assert [a["status"] for a in run["attempts"]] == ["FAILED", "COMPLETED"]
        assert run["attempts"][0]["error"]["code"] == "worker_lost"
        steps = transitions(stack, run["id"])
        assert steps.count("COMPLETED") == 1 and steps[-1] == "COMPLETED"


def test_sigterm_lets_running_jobs_finish_within_the_grace(fault_stack: Stack) -> None:
    stack = fault_stack
    with stack.client() as client:
        short = client.post(
            "/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 0.8}}
        ).json()["id"]
        wait_until(
            lambda: client.get(f"/api/v1/runs/{short}").json()["status"] == "EXECUTING",
            what="the run to start",
        )
        stack.worker.stop(signal.SIGTERM)
        # The worker finished the run before it exited.
        assert client.get(f"/api/v1/runs/{short}").json()["status"] == "COMPLETED"

        stack.start_worker()
        long = client.post("/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 4}}).json()[
            "id"
        ]
        wait_until(
            lambda: client.get(f"/api/v1/runs/{long}").json()["status"] == "EXECUTING",
            what="the long run to start",
        )
        stack.worker.stop(signal.SIGTERM)  # past the 2 s grace the job is put back
        stack.start_worker()
        final = client.get(f"/api/v1/runs/{long}", params={"wait": 30}).json()
    assert final["status"] == "COMPLETED"
    assert transitions(stack, long).count("COMPLETED") == 1


def test_a_database_that_does_not_answer_gives_503_with_retry_after(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A gateway whose PostgreSQL is down (nothing listens on its port)."""
    import httpx

    from gateway.cli.embedded_redis import free_port
    from tests.conftest import TEST_SECRET
    from tests.helpers import Process, child_env, wait_http_ok

    port = free_port()
    env = child_env(
        DATABASE_URL=f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none",
        REDIS_URL=f"{redis_server.url}/9",
        GATEWAY_SECRET_KEY=TEST_SECRET,
        PORT=str(port),
    )
    gateway = Process(
        "gateway-nodb", ["-m", "gateway", "web"], env, tmp_path_factory.mktemp("logs-nodb")
    ).start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", gateway)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/tasks/echo/trigger",
            json={"payload": {}},
            headers={"authorization": "Bearer gw_sk_x"},
        )
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "2"
        assert answer.json()["error"]["code"] == "database_unavailable"
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 503
        assert [c["check"] for c in ready.json()["error"]["details"]] == ["database"]
    finally:
        gateway.stop()


def test_json_logs_carry_the_run(fault_stack: Stack) -> None:
    import json

    run = fault_stack.run("echo", {})
    lines = [
        json.loads(line)
        for line in fault_stack.worker.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("run_id") == run["id"]]
    assert [line["event"] for line in mine] == ["started", "completed"]
    assert all(line["task"] == "echo" and line["attempt"] == 1 for line in mine)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_chaos_every_run_final_once_and_called_back(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A few hundred runs with callbacks through a killed worker, a killed
    dispatcher, a flushed Redis, a stopped gateway and a receiver that is
    down (bench/chaos.py)."""
    import os

    from bench.chaos import run_chaos
    from bench.databases import create_database, drop_database

    server = os.environ.get("TEST_DATABASE_URL")
    if backend == "postgresql" and not server:
        pytest.skip("TEST_DATABASE_URL is not set")
    database_url = create_database(server) if backend == "postgresql" and server else None
    try:
        summary = run_chaos(200, database_url, workdir=tmp_path_factory.mktemp("chaos"))
    finally:
        if database_url and server:
            drop_database(server, database_url)
    print(summary.line())  # where the time went, for -s and failure reports
    assert (summary.lost, summary.double_final, summary.unstable_ids) == (0, 0, 0), summary
    assert summary.final == summary.runs == 200
    assert summary.callbacks_received == summary.callbacks_expected == 200
    # Two gateway processes counted the transitions since the restart; a scrape
    # of either sums both.
    assert summary.metrics_completed == summary.completed_since_restart > 0


def test_a_job_taken_by_a_worker_that_died_before_starting_it_runs_again(
    fault_stack: Stack,
) -> None:
    """A QUEUED run whose job sits "in progress" in arq (a worker took it) but
    never reported a start: the worker died in between. arq alone would leave
    it until the job timeout; the reconciler retries it."""
    import datetime as dt

    import redis

    from db.ids import new_id
    from db.models import Run
    from db.types import utcnow
    from tests.helpers import db_call

    stack = fault_stack
    run_id = new_id("run")
    long_ago = utcnow() - dt.timedelta(seconds=30)
    row = {
        "id": run_id,
        "project_id": stack.project_id,
        "task": "echo",
        "status": "QUEUED",
        "attempt": 1,
        "payload": {"taken": True},
        "tags": [],
        "metadata": {},
        "created_at": long_ago,
        "updated_at": long_ago,
        "max_attempts": 3,
    }
    client = redis.Redis.from_url(stack.redis_url)
    try:
        client.set(f"arq:in-progress:{run_id}", b"1", px=600_000)
        db_call(
            stack.database_url, lambda conn: conn.execute(Run.__table__.insert(), row), write=True
        )
        with stack.client() as api:
            final = api.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
    finally:
        client.close()
    assert final["status"] == "COMPLETED"
    assert final["output"] == {"taken": True}
    assert [a["status"] for a in final["attempts"]] == ["FAILED", "COMPLETED"], (
        final,
        stack.query(
            "SELECT from_status, to_status, attempt FROM run_transitions "
            "WHERE run_id = :id ORDER BY id",
            id=run_id,
        ),
    )
    assert final["attempts"][0]["error"]["code"] == "worker_lost"


def test_with_the_defaults_a_killed_workers_runs_start_again_within_15_s_and_a_busy_one_keeps_its_runs(  # noqa: E501
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The default heartbeat settings: a SIGKILLed worker's runs are noticed and
    started again within 15 s; a worker kept busy (CPU-bound runs in threads on
    both cores, a task logging as fast as it can) loses none to ``worker_lost``.

    On one database (PostgreSQL when the suite has it): the judging is the
    same code on both, and ``test_runs_of_a_killed_worker_run_again…`` covers
    each; this one's 20 s are for the default timing."""
    if _backend_of(database_url) != _backends()[-1]:
        pytest.skip("run on one database only (see the docstring)")
    with (
        launch_stack(
            "heartbeats",
            databases.new("heartbeats"),
            f"{redis_server.url}/{_redis_db(database_url, 10)}",
            tmp_path_factory.mktemp("logs-heartbeats"),
        ) as stack,
        stack.client() as client,
    ):
        busy = [
            client.post(
                "/api/v1/tasks/tests.blocking/trigger",
                json={"payload": {"seconds": 1.5}, "options": {"max_attempts": 1}},
            ).json()["id"]
            for _ in range(12)
        ]
        flood = client.post(
            "/api/v1/tasks/tests.log-flood/trigger",
            json={"payload": {"lines": 10_000, "size": 2048}, "options": {"max_attempts": 1}},
        ).json()["id"]
        for run_id in [*busy, flood]:
            run = client.get(f"/api/v1/runs/{run_id}", params={"wait": 60}, timeout=70).json()
            assert run["status"] == "COMPLETED", run
            assert len(run["attempts"]) == 1, run

        sleepers = [
            client.post(
                "/api/v1/tasks/sleep/trigger",
                json={"payload": {"seconds": 60}, "options": {"max_attempts": 2}},
            ).json()["id"]
            for _ in range(3)
        ]
        wait_until(
            lambda: all(
                client.get(f"/api/v1/runs/{i}").json()["status"] == "EXECUTING" for i in sleepers
            ),
            what="every run to start",
        )
        stack.worker.stop(signal.SIGKILL)
        stack.start_worker()
        # Noticed, failed as worker_lost and started again on the new worker.
        wait_until(
            lambda: all(
                len(client.get(f"/api/v1/runs/{i}").json()["attempts"]) == 2 for i in sleepers
            ),
            timeout=15,
            what="the lost runs' second attempts",
        )
        for run_id in sleepers:
            run = client.get(f"/api/v1/runs/{run_id}").json()
            assert run["attempts"][0]["error"]["code"] == "worker_lost", run
            client.post(f"/api/v1/runs/{run_id}/cancel")
