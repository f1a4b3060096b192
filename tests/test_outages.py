"""Outages of what the gateway stands on: Redis goes away and comes back; the
database restarts. Nothing exits, nothing answers 500, and work resumes by
itself once the dependency answers again."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from db.migrate import upgrade
from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, launch_stack
from tests.helpers import wait_until
from tests.postgres import Postgres
from tests.postgres import missing as postgres_missing


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis of this module's own: stopping it disturbs no other test."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-outage")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def outage_stack(
    databases: Databases, own_redis: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with launch_stack(
        "outage",
        databases.new("outage"),
        f"{own_redis.url}/0",
        tmp_path_factory.mktemp("logs-outage"),
    ) as stack:
        yield stack


def _gauge(metrics: str, name: str) -> float | None:
    found = re.search(rf"^{name} (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else None


def _lines(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text)


def test_a_worker_and_metrics_ride_out_a_redis_outage(
    outage_stack: Stack, own_redis: EmbeddedRedis
) -> None:
    stack = outage_stack
    with stack.client() as client:
        assert stack.run("echo", {"before": True})["status"] == "COMPLETED"
        up = client.get("/metrics")
        assert up.status_code == 200 and _gauge(up.text, "gateway_redis_up") == 1
        own_redis.stop()
        try:
            wait_until(
                lambda: _lines(stack.worker.log_path, "Redis does not answer") >= 1,
                timeout=20,
                what="the worker to say Redis is gone",
            )
            # Metrics go on, and say what is missing.
            down = client.get("/metrics")
            assert down.status_code == 200, down.text
            assert _gauge(down.text, "gateway_redis_up") == 0
            assert _gauge(down.text, "gateway_database_up") == 1
            assert _gauge(down.text, "gateway_queue_depth") is None
            # A trigger is still taken (the run is in the database; the
            # reconciler queues its job once Redis is back).
            accepted = client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": 1}})
            assert accepted.status_code == 202, accepted.text
            # The outage lasts through several of the worker's tries.
            time.sleep(2)
            assert stack.worker.alive, stack.worker.log_tail()
        finally:
            own_redis.start()
        final = client.get(f"/api/v1/runs/{accepted.json()['id']}", params={"wait": 30}).json()
        assert final["status"] == "COMPLETED", (final, stack.worker.log_tail())
        assert stack.worker.alive, stack.worker.log_tail()
        assert stack.run("echo", {"after": True})["status"] == "COMPLETED"
    log = stack.worker.log_path
    # One line when the outage begins, per worker loop (runs, callbacks), not
    # one per try; and a line when it ends.
    assert _lines(log, "Redis does not answer") <= 4, stack.worker.log_tail()
    assert _lines(log, "Redis answers again") >= 1, stack.worker.log_tail()
    with httpx.Client(base_url=stack.base_url) as plain:
        assert _gauge(plain.get("/metrics").text, "gateway_redis_up") == 1


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    reason = postgres_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = Postgres().start()
    try:
        upgrade(server.async_url)
        yield server
    finally:
        server.close()


def test_a_postgresql_restart_gives_no_500(
    own_postgres: Postgres, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """Requests during a restart wait for the server or answer 503; a dead
    pooled connection is dropped and its unit run again, never a 500."""
    with launch_stack(
        "pg-restart",
        own_postgres.async_url,
        f"{own_redis.url}/1",
        tmp_path,
        HEARTBEAT_INTERVAL="0.5",
    ) as stack:
        statuses: list[int] = []
        run_ids: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with stack.client() as client:
                while not stop.is_set():
                    for method, path, body in (
                        ("POST", "/api/v1/tasks/sleep/trigger", {"payload": {"seconds": 0.2}}),
                        ("GET", "/api/v1/runs?limit=5", None),
                    ):
                        try:
                            answer = client.request(method, path, json=body, timeout=30)
                        except httpx.TransportError:
                            continue
                        statuses.append(answer.status_code)
                        if answer.status_code == 202:
                            run_ids.append(answer.json()["id"])

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: len(run_ids) >= 20, what="runs before the restart")
            own_postgres.restart()
            restarted = len(statuses)
            wait_until(lambda: len(statuses) > restarted + 100, what="requests after the restart")
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert 500 not in statuses, (sorted(set(statuses)), stack.gateway.log_tail())
        assert set(statuses) <= {200, 202, 503}, sorted(set(statuses))
        assert "Traceback" not in stack.gateway.log_path.read_text(), stack.gateway.log_tail()
        with stack.client() as client:
            finals = [
                client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()["status"]
                for run_id in run_ids
            ]
        assert set(finals) == {"COMPLETED"}, finals


@pytest.fixture(scope="module")
def guarded_stack(
    databases: Databases, own_redis: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with launch_stack(
        "guarded",
        databases.new("guarded"),
        f"{own_redis.url}/2",
        tmp_path_factory.mktemp("logs-guarded"),
        WEB_HEADER_TIMEOUT="1",
        WEB_MAX_CONNECTIONS="300",
    ) as stack:
        yield stack


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _closed_with(sock: socket.socket) -> bytes:
    """What the server sent before it closed the connection."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_slow_and_silent_clients_are_cut_and_connections_are_bounded(
    guarded_stack: Stack,
) -> None:
    stack = guarded_stack
    port = int(stack.base_url.rsplit(":", 1)[1])
    silent = [_connect(port) for _ in range(100)]
    slow = [_connect(port) for _ in range(100)]
    try:
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        # Real clients are served meanwhile.
        with httpx.Client(base_url=stack.base_url) as client:
            assert client.get("/healthz").status_code == 200
        # One more header line each, within the timeout, is not enough: the
        # headers must be complete in WEB_HEADER_TIMEOUT.
        for sock in slow:
            sock.sendall(b"x-drip: 1\r\n")
        for sock in [*silent, *slow]:
            answer = _closed_with(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            assert b'"request_timeout"' in answer
        # Beyond WEB_MAX_CONNECTIONS, a connection gets 503 at once.
        held = [_connect(port) for _ in range(300)]
        try:
            extra = _connect(port)
            answer = _closed_with(extra)
            assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
            assert b'"too_many_connections"' in answer and b"retry-after: 1" in answer
            extra.close()
        finally:
            for sock in held:
                sock.close()
        # A complete request on a connection of its own is still served.
        wait_until(
            lambda: httpx.get(stack.base_url + "/healthz").status_code == 200,
            what="the gateway to take connections again",
        )
    finally:
        for sock in [*silent, *slow]:
            sock.close()
