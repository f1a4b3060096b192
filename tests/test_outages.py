"""Outages of what the gateway stands on: Redis goes away and comes back; the
database restarts. Nothing exits, nothing answers 500, and work resumes by
itself once the dependency answers again."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, launch_stack
from tests.helpers import wait_until


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
        final = client.get(
            f"/api/v1/runs/{accepted.json()['id']}", params={"wait": 30}
        ).json()
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
