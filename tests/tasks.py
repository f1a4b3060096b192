"""Tasks that only the test suite registers (through TASK_MODULES=tests.tasks)."""

from __future__ import annotations

import time
from typing import Any

from jobs.tasks.registry import TaskContext, TaskError, task


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


@task("tests.nan")
async def nan(payload: Any, ctx: TaskContext) -> Any:
    """An output that is not JSON: NaN (Python's json would write it)."""
    return {"value": float("nan")}


@task("tests.nul-output")
async def nul_output(payload: Any, ctx: TaskContext) -> Any:
    """An output PostgreSQL could not store (a NUL in a string)."""
    return {"text": "before\x00after"}


@task("tests.dirty-message")
async def dirty_message(payload: Any, ctx: TaskContext) -> None:
    """Fail with a message that holds a NUL and a lone surrogate."""
    raise TaskError("dirty", "file na\x00me \udcff.txt")


@task("tests.blocking")
def blocking(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """A plain function that blocks (CPU work, a blocking call): it runs in a
    thread, so the worker's other runs go on meanwhile."""
    import threading

    until = time.monotonic() + float(payload.get("seconds", 1.0))
    spins = 0
    while time.monotonic() < until:
        spins += 1
    return {"thread": threading.current_thread().name, "spins": spins}


@task("tests.limited", queue="tests-limited", concurrency_limit=1)
async def limited(payload: Any, ctx: TaskContext) -> None:
    """Sleep ``seconds``; one run at a time across every worker (its queue's limit)."""
    import asyncio

    await asyncio.sleep(float(payload.get("seconds", 0.1)))


@task("tests.logs")
async def logs(payload: Any, ctx: TaskContext) -> dict[str, int]:
    """Log ``lines`` lines through ``ctx.logger`` (with ``extra``), then
    raise if ``raise`` is set."""
    ctx.logger.debug("starting with %s", payload)
    for n in range(int(payload.get("lines", 3))):
        ctx.logger.info("line %d of attempt %d", n, ctx.attempt, extra={"n": n, "who": "tests"})
        if payload.get("every"):
            import asyncio

            await asyncio.sleep(float(payload["every"]))
    ctx.logger.warning("almost done")
    if payload.get("raise"):
        raise RuntimeError("the task gave up")
    return {"logged": int(payload.get("lines", 3))}


@task("tests.thread-logs")
def thread_logs(payload: Any, ctx: TaskContext) -> dict[str, str]:
    """A plain function (it runs in a thread) that logs through ``ctx.logger``."""
    import threading

    ctx.logger.info("from a thread", extra={"thread": threading.current_thread().name})
    return {"thread": threading.current_thread().name}


def _flood(payload: Any, ctx: TaskContext) -> dict[str, int]:
    line = "x" * int(payload.get("size", 1024))
    extra = {"blob": "y" * int(payload["extra"])} if payload.get("extra") else {}
    for n in range(int(payload["lines"])):
        ctx.logger.info("%d %s", n, line, extra={"n": n, **extra})
    return {"logged": int(payload["lines"])}


@task("tests.log-flood")
async def log_flood(payload: Any, ctx: TaskContext) -> dict[str, int]:
    """Log ``lines`` lines of ``size`` characters (and an ``extra`` field of
    ``extra`` characters) as fast as it can."""
    return _flood(payload, ctx)


@task("tests.log-flood-thread")
def log_flood_thread(payload: Any, ctx: TaskContext) -> dict[str, int]:
    """The same from a plain function, in a thread."""
    return _flood(payload, ctx)


@task("tests.log-escapes")
async def log_escapes(payload: Any, ctx: TaskContext) -> None:
    """Log lines holding terminal control sequences (a title, a screen clear,
    a hyperlink, a right-to-left override) and an ``extra`` field."""
    ctx.logger.info("\x1b]0;pwned\x07title \x1b[2J\x1b[Hcleared", extra={"who": "tests"})
    ctx.logger.info("\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\ and \u202eesrever")
