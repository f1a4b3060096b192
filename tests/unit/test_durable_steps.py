"""The worker's side of durable steps (``jobs.runs.durable.Steps``), with no
processes: keys, kept results, the determinism check and what a wait reports."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from jobs.runs.durable import NondeterministicStep, Steps, Suspend
from jobs.runs.runlog import CURRENT_STEP
from jobs.tasks.registry import TaskError, load_tasks


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """The test, run on an event loop of its own (the suite has no async plugin)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def steps(kept: dict[str, Any] | None = None) -> Steps:
    return Steps(kept, run_id="run_x", reporter=None, tasks=load_tasks(), max_output_bytes=1000)


def kept_of(done: Steps) -> dict[str, Any]:
    """What the gateway would hand the next execution (``node_states``)."""
    return {
        r["key"]: {
            "status": r["status"],
            "output": r.get("output"),
            "kind": r["kind"],
            "position": r["position"],
        }
        for r in done.records
    }


@run_async
async def test_a_step_runs_once_and_its_kept_result_comes_back() -> None:
    calls: list[int] = []

    def count() -> tuple[int, str]:
        calls.append(1)
        assert CURRENT_STEP.get() == "count"
        return (len(calls), "x")

    first = steps()
    assert await first.step("count", count) == [1, "x"]  # as JSON keeps it
    again = steps(kept_of(first))
    assert await again.step("count", count) == [1, "x"]
    assert calls == [1] and again.records == []


@run_async
async def test_names_get_numbered_and_a_changed_order_is_nondeterministic() -> None:
    first = steps()
    for name in ("a", "a", "b"):
        await first.step(name, str, name)
    assert [r["key"] for r in first.records] == ["a", "a:2", "b"]
    swapped = steps(kept_of(first))
    await swapped.step("a", lambda: "a")
    with pytest.raises(NondeterministicStep) as caught:
        await swapped.step("b", lambda: "b")
    assert caught.value.code == "nondeterministic_step"
    assert "'b'" in caught.value.message and "'a:2'" in caught.value.message
    other_kind = steps(kept_of(first))
    with pytest.raises(NondeterministicStep):
        await other_kind.sleep(1, name="a")


@run_async
async def test_a_wait_suspends_and_reports_what_it_waits_on() -> None:
    first = steps()
    await first.step("before", lambda: 1)
    with pytest.raises(Suspend):
        await first.trigger_and_wait("echo", {"n": 1}, tags=["t"])
    assert first.suspended == "trigger:echo"
    report = first.waiting()
    assert report["spawn"] == [
        {"node_id": "trigger:echo", "task": "echo", "payload": {"n": 1}, "options": {"tags": ["t"]}}
    ]
    assert [(r["key"], r["status"]) for r in report["steps"]] == [
        ("before", "completed"),
        ("trigger:echo", "running"),
    ]
    with pytest.raises(TaskError) as caught:
        await first.sleep(1)  # a second wait while one is pending
    assert caught.value.code == "concurrent_wait"
    kept = kept_of(first)
    kept["trigger:echo"].update(status="failed", run_id="run_c", error={"code": "boom"})
    later = steps(kept)
    assert await later.step("before", lambda: 2) == 1
    child = await later.trigger_and_wait("echo", {"n": 1})
    assert (child.ok, child.id, child.error) == (False, "run_c", {"code": "boom"})


@run_async
async def test_bad_calls_fail_with_clear_codes() -> None:
    for call, code in [
        (lambda s: s.trigger_and_wait("no-such-task"), "unknown_task"),
        (lambda s: s.trigger_and_wait("sleep", {"seconds": "x"}), "invalid_payload"),
        (
            lambda s: s.trigger_and_wait("echo", {}, callback_url="http://x"),
            "invalid_child_options",
        ),
        (lambda s: s.sleep(-1), "invalid_sleep"),
        (lambda s: s.sleep_until("2026-01-01T00:00:00"), "invalid_sleep"),
        (lambda s: s.step("big", lambda: "x" * 2000), "step_output_too_large"),
        (lambda s: s.step("set", lambda: {1, 2}), "step_output_not_serializable"),
        (lambda s: s.step("", lambda: 1), "invalid_step"),
    ]:
        with pytest.raises(TaskError) as caught:
            await call(steps())
        assert caught.value.code == code


@run_async
async def test_a_durable_call_inside_a_step_is_refused() -> None:
    s = steps()

    async def inner() -> None:
        await s.sleep(1)

    with pytest.raises(TaskError) as caught:
        await s.step("outer", inner)
    assert caught.value.code == "nested_step"
    [record] = s.records
    assert (record["status"], record["error"]["code"]) == ("failed", "nested_step")


@run_async
async def test_a_failed_step_runs_again_on_the_next_attempt() -> None:
    first = steps()

    def flaky() -> int:
        raise ValueError("no")

    with pytest.raises(ValueError):
        await first.step("flaky", flaky)
    [record] = first.records
    assert record["error"] == {
        "code": "task_exception",
        "message": "ValueError: no",
        "retryable": True,
    }
    kept = kept_of(first)
    assert await steps(kept).step("flaky", lambda: 7) == 7


@run_async
async def test_a_batch_returns_results_in_order_once_all_ended() -> None:
    first = steps()
    items = [("echo", {"n": n}) for n in range(3)]
    with pytest.raises(Suspend):
        await first.batch_trigger_and_wait(items)
    assert [c["node_id"] for c in first.spawn] == ["batch[0]", "batch[1]", "batch[2]"]
    kept = kept_of(first)
    kept["batch[0]"] = {"status": "completed", "output": {"n": 0}, "run_id": "r0"}
    kept["batch[1]"] = {"status": "running", "run_id": "r1"}
    with pytest.raises(Suspend):
        await steps(kept).batch_trigger_and_wait(items)
    kept["batch[1]"] = {"status": "failed", "run_id": "r1", "error": {"code": "e"}}
    kept["batch[2]"] = {"status": "completed", "output": {"n": 2}, "run_id": "r2"}
    last = steps(kept)
    results = await last.batch_trigger_and_wait(items)
    assert [(r.ok, r.id, r.output) for r in results] == [
        (True, "r0", {"n": 0}),
        (False, "r1", None),
        (True, "r2", {"n": 2}),
    ]
    assert [(r["key"], r["status"]) for r in last.records] == [("batch", "completed")]
