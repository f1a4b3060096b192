"""The core loop over real processes: trigger → worker → signed event → database → poll."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import Stack
from tests.helpers import wait_until


def transitions(stack: Stack, run_id: str) -> list[tuple[str | None, str]]:
    rows = stack.query(
        "SELECT from_status, to_status FROM run_transitions WHERE run_id = :id ORDER BY id",
        id=run_id,
    )
    return [(r[0], r[1]) for r in rows]


def test_echo_run_goes_queued_executing_completed(stack: Stack) -> None:
    payload = {"image": "cat.png", "sizes": [1, 2, 3], "nested": {"ok": True}}
    with stack.client() as client:
        response = client.post(
            "/api/v1/tasks/echo/trigger",
            json={
                "payload": payload,
                "options": {"tags": ["demo", "cats"], "metadata": {"user": 7}},
            },
        )
        assert response.status_code == 202
        accepted = response.json()
        assert accepted["id"].startswith("run_")
        assert accepted["status"] == "QUEUED"
        assert accepted["is_final"] is False
        assert response.headers["location"] == f"/api/v1/runs/{accepted['id']}"

        run = client.get(response.headers["location"], params={"wait": 30}).json()

    assert run["status"] == "COMPLETED"
    assert run["is_final"] is True
    assert run["output"] == payload
    assert run["payload"] == payload
    assert run["error"] is None
    assert run["tags"] == ["demo", "cats"]
    assert run["metadata"] == {"user": 7}
    assert run["task"] == "echo"
    assert run["created_at"] <= run["started_at"] <= run["finished_at"]
    assert isinstance(run["duration_ms"], int) and run["duration_ms"] >= 0
    assert [a["status"] for a in run["attempts"]] == ["COMPLETED"]
    assert run["attempts"][0]["number"] == 1
    assert transitions(stack, run["id"]) == [
        (None, "QUEUED"),
        ("QUEUED", "EXECUTING"),
        ("EXECUTING", "COMPLETED"),
    ]


def test_get_without_wait_answers_at_once_with_the_current_status(stack: Stack) -> None:
    with stack.client() as client:
        run_id = client.post(
            "/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 0.5}}
        ).json()["id"]
        first = client.get(f"/api/v1/runs/{run_id}").json()
        assert first["status"] in ("QUEUED", "EXECUTING")
        assert first["is_final"] is False
        # A short wait that ends before the run does returns the run unfinished.
        early = client.get(f"/api/v1/runs/{run_id}", params={"wait": 0.05}).json()
        assert early["id"] == run_id
        final = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
    assert final["status"] == "COMPLETED"
    assert final["output"] == {"slept": 0.5}


def test_failing_task_ends_failed_and_the_worker_lives_on(stack: Stack) -> None:
    failed = stack.run("tests.fail", {"code": "bad_thing", "message": "the thing was bad"})
    assert failed["status"] == "FAILED"
    assert failed["error"] == {"code": "bad_thing", "message": "the thing was bad"}
    assert failed["output"] is None
    assert failed["attempts"][0]["error"]["code"] == "bad_thing"
    assert transitions(stack, failed["id"])[-1] == ("EXECUTING", "FAILED")

    crashed = stack.run("tests.crash", {})
    assert crashed["status"] == "FAILED"
    assert crashed["error"]["code"] == "task_exception"
    assert "ValueError: division by zero" in crashed["error"]["message"]

    too_big = stack.run("tests.big-output", {"bytes": 100_000})
    assert too_big["status"] == "FAILED"
    assert too_big["error"]["code"] == "output_too_large"

    not_json = stack.run("tests.not-json", {})
    assert not_json["status"] == "FAILED"
    assert not_json["error"]["code"] == "output_not_serializable"

    assert stack.worker.alive


def test_outputs_and_messages_every_database_can_store(stack: Stack) -> None:
    """An output one database could not store fails the run at once, with a
    clear code; a message that holds anything is cleaned, not refused."""
    for task, what in (("tests.nan", "NaN"), ("tests.nul-output", "NUL")):
        run = stack.run(task, {})
        assert run["status"] == "FAILED", run
        assert run["error"]["code"] == "output_not_serializable"
        assert what in run["error"]["message"]
        assert len(run["attempts"]) == 1  # not retried, not left to a heartbeat
    dirty = stack.run("tests.dirty-message", {})
    assert dirty["status"] == "FAILED"
    assert dirty["error"] == {"code": "dirty", "message": "file na\ufffdme \ufffd.txt"}
    assert stack.worker.alive


def test_a_plain_function_task_runs_in_a_thread_beside_other_runs(stack: Stack) -> None:
    with stack.client() as client:
        blocking = client.post(
            "/api/v1/tasks/tests.blocking/trigger", json={"payload": {"seconds": 2}}
        ).json()

        def executing() -> bool:
            status = client.get(f"/api/v1/runs/{blocking['id']}").json()["status"]
            return bool(status == "EXECUTING")

        wait_until(executing, what="the blocking task to start")
        # While it spins, the worker's event loop is free: another run starts and ends.
        echo = stack.run("echo", {"beside": "a blocking task"})
        assert echo["status"] == "COMPLETED"
        assert client.get(f"/api/v1/runs/{blocking['id']}").json()["status"] == "EXECUTING"
        done = client.get(f"/api/v1/runs/{blocking['id']}", params={"wait": 30}).json()
    assert done["status"] == "COMPLETED", done
    assert done["output"]["thread"] != "MainThread" and done["output"]["spins"] > 0
    after = stack.run("echo", {"still": "alive"})
    assert after["status"] == "COMPLETED"
    assert after["output"] == {"still": "alive"}


def test_200_concurrent_runs_complete_with_one_start_and_one_end_each(stack: Stack) -> None:
    async def main() -> list[dict[str, Any]]:
        headers = {"authorization": f"Bearer {stack.api_key}"}
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(
            base_url=stack.base_url, headers=headers, timeout=70.0, limits=limits
        ) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": n}})
                    for n in range(200)
                )
            )
            assert [r.status_code for r in responses] == [202] * 200
            ids = [r.json()["id"] for r in responses]
            finals = await asyncio.gather(
                *(client.get(f"/api/v1/runs/{run_id}", params={"wait": 60}) for run_id in ids)
            )
            return [f.json() for f in finals]

    runs = asyncio.run(main())
    assert len({r["id"] for r in runs}) == 200
    assert [r["status"] for r in runs] == ["COMPLETED"] * 200
    assert sorted(r["output"]["n"] for r in runs) == list(range(200))

    ids = [r["id"] for r in runs]
    rows = stack.query(
        "SELECT run_id, to_status, COUNT(*) FROM run_transitions "
        "WHERE to_status IN ('EXECUTING', 'COMPLETED', 'FAILED') GROUP BY run_id, to_status"
    )
    counts = {(r[0], r[1]): r[2] for r in rows if r[0] in set(ids)}
    for run_id in ids:
        assert counts.get((run_id, "EXECUTING")) == 1, run_id
        assert counts.get((run_id, "COMPLETED")) == 1, run_id
        assert (run_id, "FAILED") not in counts


def test_run_finishing_while_the_gateway_is_down_ends_completed(stack: Stack) -> None:
    with stack.client() as client:
        run_id = client.post(
            "/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 1.0}}
        ).json()["id"]
        wait_until(
            lambda: client.get(f"/api/v1/runs/{run_id}").json()["status"] == "EXECUTING",
            what="the run to start",
        )
    stack.gateway.stop()  # SIGTERM: uvicorn shuts down, then re-raises the signal
    assert not stack.gateway.alive

    # The worker finishes the task, cannot report, and hands the report to a
    # deferred arq job that keeps trying.
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    try:
        wait_until(
            lambda: r.exists(f"arq:job:report:{run_id}:1:0:completed"),
            timeout=30,
            what="the completed report to be handed off",
        )
    finally:
        r.close()
    rows = stack.query("SELECT status FROM runs WHERE id = :id", id=run_id)
    assert rows[0][0] == "EXECUTING"

    stack.start_gateway()
    with stack.client() as client:
        run = client.get(f"/api/v1/runs/{run_id}", params={"wait": 60}).json()
    assert run["status"] == "COMPLETED"
    assert run["output"] == {"slept": 1.0}
    assert transitions(stack, run_id) == [
        (None, "QUEUED"),
        ("QUEUED", "EXECUTING"),
        ("EXECUTING", "COMPLETED"),
    ]


def test_another_projects_key_cannot_see_a_run(stack: Stack) -> None:
    run = stack.run("echo", {"secret": "mine"})
    other = stack.new_key("someone-else")
    with stack.client(other) as client:
        foreign = client.get(f"/api/v1/runs/{run['id']}")
        missing = client.get("/api/v1/runs/run_doesnotexist")
        foreign_wait = client.get(f"/api/v1/runs/{run['id']}", params={"wait": 1})
    assert foreign.status_code == missing.status_code == foreign_wait.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "run_not_found"
    assert "mine" not in foreign.text
    # And the owner still sees it.
    with stack.client() as client:
        assert client.get(f"/api/v1/runs/{run['id']}").status_code == 200


def test_health_and_readiness(stack: Stack) -> None:
    assert httpx.get(stack.base_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(stack.base_url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "schema": "ok"}


def test_task_list_shows_each_task_with_its_payload_schema(stack: Stack) -> None:
    with stack.client() as client:
        tasks = {t["name"]: t for t in client.get("/api/v1/tasks").json()["data"]}
    assert {"echo", "sleep", "tests.fail"} <= set(tasks)
    assert "seconds" in tasks["sleep"]["payload_schema"]["properties"]
