"""Workers in view: ``GET /api/v1/workers``, the dashboard's page, and a
worker's health port, against real worker processes.

A worker says it is there on every heartbeat, is listed ``online`` with its
slots and the runs it holds (each project sees its own runs only), ``stopped``
after a clean stop and ``lost`` once a killed one has been silent for
``HEARTBEAT_TIMEOUT``. Its health port answers 200 while its event loop turns
and 503 while a task blocks it.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli.embedded_redis import EmbeddedRedis, free_port
from jobs.protocol import SIGNATURE_HEADER, WORKERS_PATH, dumps, sign_request
from tests.conftest import TEST_SECRET, Databases, Stack, _redis_db, launch_stack
from tests.helpers import Process, dashboard_session, wait_until

HEARTBEAT_TIMEOUT = 2.0
HEALTH_PORT = free_port()


@pytest.fixture(scope="module")
def workers_stack(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    with launch_stack(
        "workers",
        databases.new("workers"),
        f"{redis_server.url}/{_redis_db(database_url, 14)}",
        tmp_path_factory.mktemp("logs-workers"),
        HEARTBEAT_INTERVAL="0.2",
        HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
        worker_env={
            "WORKER_HEALTH_PORT": str(HEALTH_PORT),
            "WORKER_HEALTH_HOST": "127.0.0.1",
            "WORKER_HEALTH_STALL": "1",
        },
        WORKER_CONCURRENCY="4",
    ) as stack:
        yield stack


def _workers(stack: Stack, key: str | None = None) -> list[dict[str, Any]]:
    with stack.client(key) as client:
        answer = client.get("/api/v1/workers")
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"])


def _worker(stack: Stack, pid: int, key: str | None = None) -> dict[str, Any] | None:
    return next((w for w in _workers(stack, key) if w["pid"] == pid), None)


def _start_worker(stack: Stack, logs: Path, name: str, **env: str) -> Process:
    return Process(name, ["-m", "gateway", "worker"], {**stack.env, **env}, logs).start()


def _pid(process: Process) -> int:
    assert process.popen is not None
    return process.popen.pid


def test_a_worker_is_listed_with_its_slots_and_the_runs_it_holds(workers_stack: Stack) -> None:
    stack = workers_stack
    pid = _pid(stack.worker)
    worker = wait_until(lambda: _worker(stack, pid), what="the worker listed")
    assert worker["status"] == "online"
    assert worker["id"] == f"{socket.gethostname()}:{pid}"
    assert (worker["host"], worker["slots"], worker["slots_in_use"]) == (
        socket.gethostname(),
        4,
        0,
    )
    assert {"echo", "tests.limited", "crop-image"} <= set(worker["tasks"])
    assert worker["queue"] == stack.env.get("QUEUE_NAME", "gateway:queue")
    assert worker["version"] and worker["runs"] == []

    with stack.client() as client:
        accepted = client.post(
            "/api/v1/tasks/tests.limited/trigger", json={"payload": {"seconds": 3}}
        )
        run_id = accepted.json()["id"]
        held = wait_until(
            lambda: (w := _worker(stack, pid)) and run_id in w["runs"] and w,
            what="the run in the worker's hand",
        )
        assert held["slots_in_use"] == 1
        # Another project sees the worker, but none of this project's runs.
        stranger = _worker(stack, pid, stack.new_key("workers-stranger"))
        assert stranger is not None and stranger["runs"] == []
        dash = dashboard_session(stack.base_url, stack.api_key)
        try:
            page = dash.get("/dashboard/workers")
        finally:
            dash.close()
        assert page.status_code == 200
        assert f'data-worker="{worker["id"]}"' in page.text and run_id in page.text
        assert client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()["is_final"]
    freed = wait_until(
        lambda: (w := _worker(stack, pid)) and not w["runs"] and w, what="the slot freed"
    )
    assert freed["slots_in_use"] == 0


def test_a_stopped_worker_says_so_and_a_killed_one_is_lost(
    workers_stack: Stack, tmp_path: Path
) -> None:
    stack = workers_stack
    stopping = _start_worker(stack, tmp_path, "stopping")
    killed = _start_worker(stack, tmp_path, "killed")
    try:
        for process in (stopping, killed):
            wait_until(
                lambda p=process: (w := _worker(stack, _pid(p))) and w["status"] == "online",
                what="the extra worker online",
            )
        assert stopping.stop() == 0
        gone = _worker(stack, _pid(stopping))
        assert gone is not None and gone["status"] == "stopped"
        os.kill(_pid(killed), signal.SIGKILL)
        killed.stop()
        lost = wait_until(
            lambda: (w := _worker(stack, _pid(killed))) and w["status"] == "lost" and w,
            timeout=HEARTBEAT_TIMEOUT + 10,
            what="the killed worker lost",
        )
        assert lost["last_heartbeat_at"]
        assert _worker(stack, _pid(stack.worker))["status"] == "online"  # type: ignore[index]
    finally:
        stopping.stop()
        killed.stop()


def test_presence_reports_are_signed_and_checked(workers_stack: Stack) -> None:
    stack = workers_stack
    # The stack's own worker announces itself first (on a fresh stack it could
    # otherwise do so between the two readings).
    wait_until(lambda: _worker(stack, _pid(stack.worker)), what="the worker listed")
    before = _workers(stack)
    url = stack.base_url + WORKERS_PATH
    forged = {
        "id": "forged:1",
        "host": "h",
        "pid": 1,
        "version": "x",
        "queue": "q",
        "tasks": [],
        "slots": 1,
        "slots_in_use": 0,
        "runs": [],
        "started_at": "now",
    }
    body = dumps(forged)
    unsigned = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert unsigned.status_code == 401
    wrong = sign_request("not-the-gateway-secret", "POST", WORKERS_PATH, "", body)
    assert httpx.post(url, content=body, headers={SIGNATURE_HEADER: wrong}).status_code == 401
    bad = dumps({**forged, "slots": -1})
    refused = httpx.post(
        url,
        content=bad,
        headers={SIGNATURE_HEADER: sign_request(TEST_SECRET, "POST", WORKERS_PATH, "", bad)},
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["details"][0]["path"] == "slots"
    assert {w["id"] for w in _workers(stack)} == {w["id"] for w in before}


def test_the_health_port_answers_while_the_loop_turns_and_503_while_blocked(
    workers_stack: Stack,
) -> None:
    stack = workers_stack
    health = f"http://127.0.0.1:{HEALTH_PORT}/healthz"

    def answer() -> httpx.Response | None:
        try:
            return httpx.get(health, timeout=0.5)
        except httpx.TransportError:
            return None

    # The port may answer before the heartbeat thread's first call has: then
    # the gateway has not answered yet (null), and the next answers say when.
    ok = wait_until(
        lambda: (
            (a := answer())
            and a.status_code == 200
            and a.json()["gateway_answered_seconds_ago"] is not None
            and a
        ),
        what="200, the gateway heard",
    )
    body = ok.json()
    assert body["status"] == "ok" and body["worker_id"].endswith(f":{_pid(stack.worker)}")
    assert body["slots"] == 4 and 0 <= body["gateway_answered_seconds_ago"] < 30
    assert httpx.get(health.replace("/healthz", "/other")).status_code == 404
    # A task that blocks the event loop for 4 s: the port says so, the
    # heartbeats (a thread) go on, and the run still completes.
    with stack.client() as client:
        run_id = client.post(
            "/api/v1/tasks/tests.hog-loop/trigger", json={"payload": {"seconds": 4}}
        ).json()["id"]
        stalled = wait_until(
            lambda: (a := answer()) and a.status_code == 503 and a, timeout=20, what="503"
        )
        assert stalled.json()["status"] == "stalled"
        assert stalled.json()["loop_stuck_seconds"] >= 1
        final = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
    assert final["status"] == "COMPLETED", final
    wait_until(lambda: (a := answer()) and a.status_code == 200, what="200 again")
