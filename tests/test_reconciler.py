"""Redis loses its data; the database does not; the reconciler puts back what is due."""

from __future__ import annotations

import redis

from tests.conftest import Stack
from tests.helpers import wait_until
from tests.receiver import Receiver


def flush(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


def test_queued_runs_and_pending_deliveries_survive_a_redis_flush(stack: Stack) -> None:
    key = stack.new_key("reconciled")
    down = Receiver()  # refuses connections until started
    with stack.client(key) as client:
        endpoint = client.post("/api/v1/webhooks", json={"url": down.url("/lost")}).json()
        down.verify_with("/lost", endpoint["secret"])
        first = client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": 0}}).json()
        assert (
            client.get(f"/api/v1/runs/{first['id']}", params={"wait": 30}).json()["status"]
            == "COMPLETED"
        )

        def failed_once() -> bool:
            found = client.get(f"/api/v1/runs/{first['id']}/deliveries").json()["data"]
            return bool(found) and len(found[0]["attempts"]) >= 1

        wait_until(failed_once, what="the first delivery attempt to fail")

        stack.worker.stop()
        try:
            ids = [
                client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": n}}).json()["id"]
                for n in range(1, 6)
            ]
            # Redis loses every queued job, the delivery's retry with them.
            flush(stack)
            assert all(
                client.get(f"/api/v1/runs/{run_id}").json()["status"] == "QUEUED" for run_id in ids
            )
            down.start()
        finally:
            stack.start_worker()
        try:
            finals = [
                client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json() for run_id in ids
            ]
            assert [f["status"] for f in finals] == ["COMPLETED"] * 5
            assert [f["output"] for f in finals] == [{"n": n} for n in range(1, 6)]
            calls = down.wait_for(
                lambda calls: {c.json()["data"]["id"] for c in calls} >= {first["id"], *ids},
                "/lost",
                timeout=30,
            )
            assert all(c.verified_by for c in calls)
        finally:
            down.stop()
    # Each run still went through one start and one end.
    for run_id in ids:
        rows = stack.query(
            "SELECT to_status FROM run_transitions WHERE run_id = :id ORDER BY id", id=run_id
        )
        assert [r[0] for r in rows] == ["QUEUED", "EXECUTING", "COMPLETED"]


def test_a_run_queued_again_keeps_its_limits_and_priority(stack: Stack) -> None:
    """The reconciler builds a lost run's job as every other path does: its
    ``max_duration`` still ends it, its priority still scores it."""
    client_redis = redis.Redis.from_url(stack.redis_url)
    stack.worker.stop()
    try:
        with stack.client() as client:
            run = client.post(
                "/api/v1/tasks/sleep/trigger",
                json={
                    "payload": {"seconds": 20},
                    "options": {"max_duration": 1, "priority": 3600, "max_attempts": 1},
                },
            ).json()
            flush(stack)
            # Queued again by the reconciler (after RECONCILE_GRACE), with
            # an hour's head start on arq's queue (3,600,000 turns).
            score = wait_until(
                lambda: client_redis.zscore("gateway:queue", run["id"]),
                timeout=20,
                what="the reconciler to queue the lost job again",
            )
            turns = client_redis.get("gateway:queue:turn")
            assert turns is not None and score < int(turns) - 3_599_000
    finally:
        stack.start_worker()
        client_redis.close()
    with stack.client() as client:
        done = client.get(f"/api/v1/runs/{run['id']}", params={"wait": 30}).json()
    assert done["status"] == "TIMED_OUT", done
    assert done["error"]["code"] == "max_duration_exceeded"
