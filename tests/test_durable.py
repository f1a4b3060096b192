"""Durable steps inside a task (``jobs.runs.durable``): children, batches, sleeps and
tokens that give the worker's slot back, kept results that never run twice,
the determinism check, and cancel; over real processes, on both databases."""

from __future__ import annotations

import datetime as dt
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, _redis_db, launch_stack
from tests.gemini import GeminiStandIn
from tests.helpers import dashboard_session, wait_until
from tests.test_tasks import RED, colors, data_uri, quadrants, unique


def _trigger(stack: Stack, task: str, payload: Any, **options: Any) -> str:
    with stack.client() as client:
        answer = client.post(
            f"/api/v1/tasks/{task}/trigger", json={"payload": payload, "options": options}
        )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def _get(stack: Stack, run_id: str, wait: float | None = None) -> dict[str, Any]:
    with stack.client() as client:
        params = {"wait": wait} if wait else {}
        return dict(client.get(f"/api/v1/runs/{run_id}", params=params).json())


def _final(stack: Stack, run_id: str) -> dict[str, Any]:
    run = _get(stack, run_id, wait=60)
    assert run["is_final"], {k: run.get(k) for k in ("status", "waiting_for", "steps", "error")}
    return run


def _waiting_at(stack: Stack, run_id: str, kind: str) -> dict[str, Any]:
    """The run once it is WAITING on a ``kind`` wait."""

    def waiting() -> dict[str, Any] | None:
        run = _get(stack, run_id)
        assert not run["is_final"], run
        found = run.get("waiting_for") or {}
        return run if run["status"] == "WAITING" and found.get("kind") == kind else None

    return wait_until(waiting, timeout=30, what=f"run {run_id} to wait on {kind}")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_crop_ask_and_wait_for_a_person_on_one_slot(
    single_slot_stack: Stack, gemini: GeminiStandIn, tmp_path: Path
) -> None:
    """Every wait gives the only slot back: the children run in it, and so
    does an unrelated run while the task waits for its token."""
    stack = single_slot_stack
    marker = unique("durable")
    tally = tmp_path / "handed-out"
    run_id = _trigger(
        stack,
        "tests.durable-review",
        {
            "crop": {
                "image": data_uri(quadrants()),
                "x_percent": 0,
                "y_percent": 0,
                "width_percent": 50,
                "height_percent": 50,
            },
            "question": f"{marker} which colour?",
            "tally": str(tally),
        },
    )
    run = _waiting_at(stack, run_id, "token")
    # While it waits, the one slot is free for others.
    other = _final(stack, _trigger(stack, "echo", {"n": 1}))
    assert other["status"] == "COMPLETED"
    assert _get(stack, run_id)["status"] == "WAITING"

    steps = {s["name"]: s for s in run["steps"]}
    assert [s["kind"] for s in run["steps"]] == ["child", "child", "waitpoint", "step", "token"]
    crop_run = _get(stack, steps["trigger:crop-image"]["runs"][0])
    ask_run = _get(stack, steps["trigger:llm"]["runs"][0])
    assert crop_run["parent_id"] == ask_run["parent_id"] == run_id
    assert crop_run["node_id"] == "trigger:crop-image"
    assert steps["trigger:crop-image"]["output"] == crop_run["output"]
    assert colors(httpx.get(crop_run["output"]["url"]).content) == {RED}
    [sent] = gemini.requests_with(marker)
    assert len(sent.images) == 1 and colors(sent.images[0][1]) == {RED}
    token = steps["waitpoint"]["output"]
    assert run["waiting_for"] == {
        "kind": "token",
        "step": "token",
        "waitpoint": token["id"],
        "until": run["waiting_for"]["until"],
    }
    assert _lines(tally) == [token["url"]]  # the link was handed out once

    # A person answers through the URL (no key), and the run goes on.
    assert httpx.post(token["url"], json={"approved": True}).status_code == 200
    done = _final(stack, run_id)
    assert done["status"] == "COMPLETED", done["error"]
    assert done["output"] == {
        "crop": crop_run["output"]["artifact_id"],
        "answer": ask_run["output"]["text"],
        "approved": True,
        "token": True,
    }
    assert [s["status"] for s in done["steps"]] == ["COMPLETED"] * 5
    assert done["steps"][-1]["output"] == {"approved": True}
    # Every execution after a wait reused what was kept: one link handed
    # out, one model call, and the run waited three times.
    assert _lines(tally) == [token["url"]]
    assert len(gemini.requests_with(marker)) == 1
    statuses = [
        r[0]
        for r in stack.query(
            "SELECT to_status FROM run_transitions WHERE run_id = :id ORDER BY id", id=run_id
        )
    ]
    assert statuses.count("WAITING") == 3 and statuses[-1] == "COMPLETED"


def test_a_batch_returns_outputs_in_order_and_a_failed_child_as_a_result(stack: Stack) -> None:
    items = [
        {"task": "echo", "payload": {"n": n}, "options": {"tags": [f"n{n}"]}} for n in range(3)
    ]
    run_id = _trigger(
        stack,
        "tests.durable-fanout",
        {"items": items, "then": {"task": "tests.fail", "payload": {"code": "nope"}}},
    )
    run = _final(stack, run_id)
    assert run["status"] == "COMPLETED", run["error"]
    batch = run["output"]["batch"]
    assert [b["output"] for b in batch] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(b["ok"] and b["error"] is None for b in batch)
    children = [_get(stack, b["id"]) for b in batch]
    assert [c["tags"] for c in children] == [["n0"], ["n1"], ["n2"]]
    assert {c["parent_id"] for c in children} == {run_id}
    failed = run["output"]["then"]
    assert failed["ok"] is False and failed["error"]["code"] == "nope"
    assert _get(stack, failed["id"])["status"] == "FAILED"
    batch_step, then_step = run["steps"]
    assert (batch_step["kind"], batch_step["status"]) == ("batch", "COMPLETED")
    assert batch_step["runs"] == [b["id"] for b in batch]
    assert (then_step["status"], then_step["error"]["code"]) == ("FAILED", "nope")


def test_bad_children_fail_the_run_with_a_clear_code(stack: Stack) -> None:
    for then, code in [
        ({"task": "no-such-task", "payload": {}}, "unknown_task"),
        ({"task": "sleep", "payload": {"seconds": "long"}}, "invalid_payload"),
    ]:
        run = _final(stack, _trigger(stack, "tests.durable-fanout", {"items": [], "then": then}))
        assert run["status"] == "FAILED" and run["error"]["code"] == code, run["error"]
        assert stack.query("SELECT COUNT(*) FROM runs WHERE parent_id = :id", id=run["id"]) == [
            (0,)
        ]


def test_a_kept_step_is_not_run_again_by_the_next_attempt(stack: Stack, tmp_path: Path) -> None:
    tally = tmp_path / "count"
    run = _final(
        stack,
        _trigger(stack, "tests.durable-retry", {"tally": str(tally)}, retry={"min_delay": 0.1}),
    )
    assert run["status"] == "COMPLETED", run["error"]
    assert run["output"] == {"counted": 1, "attempt": 2}
    assert _lines(tally) == ["count"]
    assert [a["status"] for a in run["attempts"]] == ["FAILED", "COMPLETED"]
    assert [(s["name"], s["status"]) for s in run["steps"]] == [
        ("count", "COMPLETED"),
        ("flaky", "COMPLETED"),
    ]
    with stack.client() as client:
        logs = client.get(f"/api/v1/runs/{run['id']}/logs").json()["data"]
    flaky = [line for line in logs if line["message"].startswith("the flaky step")]
    assert [line["fields"].get("step") for line in flaky] == ["flaky", "flaky"]
    browser = dashboard_session(stack.base_url, stack.api_key)
    try:
        page = browser.get(f"/dashboard/runs/{run['id']}")
    finally:
        browser.close()
    assert page.status_code == 200
    assert page.text.index('data-step="count"') < page.text.index('data-step="flaky"')


def test_a_reordered_step_fails_the_run_as_nondeterministic(stack: Stack, tmp_path: Path) -> None:
    with stack.client() as client:
        waitpoint = client.post("/api/v1/waitpoints", json={}).json()
    edited = tmp_path / "edited"
    run_id = _trigger(
        stack, "tests.durable-edited", {"edited": str(edited), "waitpoint": waitpoint["id"]}
    )
    _waiting_at(stack, run_id, "token")
    edited.touch()  # a deploy while it waits changed the order of its steps
    assert httpx.post(waitpoint["url"], json={}).status_code == 200
    run = _final(stack, run_id)
    assert run["status"] == "FAILED"
    assert run["error"]["code"] == "nondeterministic_step"
    assert "'b'" in run["error"]["message"] and "'a'" in run["error"]["message"]


def test_cancel_of_a_waiting_parent_cancels_its_child_and_it_never_runs_again(
    stack: Stack, tmp_path: Path
) -> None:
    tally = tmp_path / "after"
    with_child = _trigger(stack, "tests.durable-parent", {"child": 30, "tally": str(tally)})
    sleeping = _trigger(stack, "tests.durable-parent", {"sleep": 1.5, "tally": str(tally)})
    run = _waiting_at(stack, with_child, "children")
    [child_id] = run["waiting_for"]["runs"]
    _waiting_at(stack, sleeping, "sleep")
    with stack.client() as client:
        for run_id in (with_child, sleeping):
            assert client.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200
    assert _get(stack, with_child)["status"] == "CANCELED"
    assert _final(stack, child_id)["status"] == "CANCELED"
    # The canceled sleep's time passes; then a canary sleeps (0 s) and wakes
    # through a later pass over due waitpoints, which would have woken the
    # canceled parent too. Neither parent ran again: the tally holds the
    # canary's line alone.
    due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    wait_until(lambda: dt.datetime.now(dt.UTC) > due, timeout=10, what="the sleep's time")
    canary = _final(stack, _trigger(stack, "tests.durable-parent", {"tally": str(tally)}))
    assert canary["status"] == "COMPLETED"
    assert _lines(tally) == ["after"]
    for run_id in (with_child, sleeping):
        run = _get(stack, run_id)
        assert run["status"] == "CANCELED" and run["waiting_for"] is None
        assert [s["status"] for s in run["steps"]][-1] == "CANCELED"


@pytest.fixture(scope="module")
def restart_stack(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A stack of its own: its worker is killed and its gateway restarted."""
    with launch_stack(
        "durable",
        databases.new("durable"),
        f"{redis_server.url}/{_redis_db(database_url, 12)}",
        tmp_path_factory.mktemp("logs-durable"),
        HEARTBEAT_INTERVAL="0.3",
        HEARTBEAT_TIMEOUT="2",
    ) as stack:
        yield stack


def test_a_sleep_survives_a_killed_worker_and_a_restarted_gateway(
    restart_stack: Stack, tmp_path: Path
) -> None:
    stack = restart_stack
    before, after = tmp_path / "before", tmp_path / "after"
    run_id = _trigger(
        stack, "tests.durable-sleep", {"before": str(before), "after": str(after), "seconds": 3}
    )
    run = _waiting_at(stack, run_id, "sleep")
    until = dt.datetime.fromisoformat(run["waiting_for"]["until"].replace("Z", "+00:00"))
    stack.worker.stop(signal.SIGKILL)
    stack.gateway.stop()
    stack.start_gateway()
    stack.start_worker()
    ready = dt.datetime.fromtimestamp(stack.workers_listening(), dt.UTC)
    done = _final(stack, run_id)
    assert done["status"] == "COMPLETED", done["error"]
    assert done["output"] == {"before": 1, "after": 1}
    assert _lines(before) == ["before"] and _lines(after) == ["after"]
    sleep_step = done["steps"][1]
    assert (sleep_step["kind"], sleep_step["status"]) == ("sleep", "COMPLETED")
    woke = dt.datetime.fromisoformat(done["steps"][2]["started_at"].replace("Z", "+00:00"))
    # Never early; late by a reconciler pass at most once a worker is ready
    # (on a loaded machine the new worker may be ready after ``until``).
    assert until <= woke < max(until, ready) + dt.timedelta(seconds=10), (until, ready, woke)
    statuses = [
        r[0]
        for r in stack.query(
            "SELECT to_status FROM run_transitions WHERE run_id = :id ORDER BY id", id=run_id
        )
    ]
    assert statuses.count("WAITING") == 1 and statuses.count("COMPLETED") == 1
