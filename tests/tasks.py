"""Tasks that only the test suite registers (through TASK_MODULES=tests.tasks)."""

from __future__ import annotations

from typing import Any

from jobs.registry import TaskContext, TaskError, task


@task("tests.fail")
async def fail(payload: Any, ctx: TaskContext) -> None:
    """Fail on purpose with the code and message in the payload."""
    raise TaskError(payload.get("code", "boom"), payload.get("message", "it broke"))


@task("tests.crash")
async def crash(payload: Any, ctx: TaskContext) -> None:
    """Raise an exception the task did not plan for."""
    raise ValueError("division by zero, more or less")


@task("tests.big-output")
async def big_output(payload: Any, ctx: TaskContext) -> str:
    return "x" * int(payload["bytes"])


@task("tests.not-json")
async def not_json(payload: Any, ctx: TaskContext) -> Any:
    return {1, 2, 3}


@task("tests.flaky")
async def flaky(payload: Any, ctx: TaskContext) -> dict[str, int]:
    """Fail (retryably) until attempt ``succeed_on``."""
    if ctx.attempt < int(payload["succeed_on"]):
        raise TaskError("flaky", f"attempt {ctx.attempt} fails", retryable=True)
    return {"attempt": ctx.attempt}
