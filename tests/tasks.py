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


@task("tests.hog-loop")
async def hog_loop(payload: Any, ctx: TaskContext) -> None:
    """The mistake a health port is for: an ``async def`` that blocks the
    event loop (a blocking call not awaited) for ``seconds``."""
    time.sleep(float(payload.get("seconds", 1.0)))  # noqa: ASYNC251 (on purpose)


@task("tests.limited", queue="tests-limited", concurrency_limit=1)
async def limited(payload: Any, ctx: TaskContext) -> None:
    """Sleep ``seconds``; one run at a time across every worker (its queue's limit)."""
    import asyncio

    await asyncio.sleep(float(payload.get("seconds", 0.1)))


@task("tests.logs")
async def logs(payload: Any, ctx: TaskContext) -> dict[str, int]:
    """Log ``lines`` lines through ``ctx.logger`` (with ``extra``), then
    raise if ``raise`` is set. With ``gate`` (a path), wait after the first
    line until that file exists, so a test sees the run mid-way for certain."""
    import asyncio
    from pathlib import Path

    ctx.logger.debug("starting with %s", payload)
    for n in range(int(payload.get("lines", 3))):
        ctx.logger.info("line %d of attempt %d", n, ctx.attempt, extra={"n": n, "who": "tests"})
        if n == 0 and payload.get("gate"):
            # The test process opens the gate: a file is the signal both see.
            while not Path(payload["gate"]).exists():  # noqa: ASYNC110, ASYNC240
                await asyncio.sleep(0.02)
        if payload.get("every"):
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


# -- durable steps (jobs.runs.durable) ----------------------------------------------------


def _tally(path: str, what: str) -> int:
    """Append ``what`` to the file at ``path``; how many lines it holds now
    (the test reads the file to count how often a step's function ran)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(what + "\n")
    with open(path, encoding="utf-8") as file:
        return sum(1 for _ in file)


@task("tests.durable-review")
async def durable_review(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """Crop an image, ask the model about the crop, then wait for a person:
    each wait gives the worker's slot back."""
    crop = (await ctx.trigger_and_wait("crop-image", payload["crop"])).unwrap()
    ask = await ctx.trigger_and_wait(
        "llm",
        {"user_message": payload["question"], "images": [{"artifact_id": crop["artifact_id"]}]},
    )
    wp = await ctx.create_waitpoint(timeout=float(payload.get("timeout", 600)))
    await ctx.step("hand out the link", _tally, payload["tally"], wp.url)
    decision = await ctx.wait_for_token(wp)
    return {
        "crop": crop["artifact_id"],
        "answer": ask.unwrap()["text"],
        "approved": decision.ok and bool(decision.output.get("approved")),
        "token": decision.ok,
    }


@task("tests.durable-fanout")
async def durable_fanout(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """Three children side by side (``items``), then one more that may fail."""
    results = await ctx.batch_trigger_and_wait(payload["items"])
    single = await ctx.trigger_and_wait(payload["then"]["task"], payload["then"]["payload"])
    return {
        "batch": [{"ok": r.ok, "id": r.id, "output": r.output, "error": r.error} for r in results],
        "then": {"ok": single.ok, "id": single.id, "error": single.error},
    }


@task("tests.durable-sleep")
async def durable_sleep(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """Count, sleep, count again: each count is a step, so the counts in the
    tally files say how often each ran."""
    ctx.logger.info("before the steps")
    before = await ctx.step("count before", _tally, payload["before"], "before")
    await ctx.sleep(float(payload["seconds"]))
    after = await ctx.step("count after", _tally, payload["after"], "after")
    return {"before": before, "after": after}


def _edited(path: str) -> bool:
    import os

    return os.path.exists(path)


@task("tests.durable-edited")
async def durable_edited(payload: Any, ctx: TaskContext) -> str:
    """A task whose code changes between executions: once the file at
    ``edited`` exists, it takes its steps in another order (as a deploy that
    reordered them would)."""
    first, second = ("b", "a") if _edited(payload["edited"]) else ("a", "b")
    await ctx.step(first, lambda: first)
    await ctx.wait_for_token(payload["waitpoint"])
    await ctx.step(second, lambda: second)
    return "done"


@task("tests.durable-retry")
async def durable_retry(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """A kept step, then one that fails on the first attempt: the second
    attempt gets the first step's result back without running it."""

    def flaky() -> int:
        ctx.logger.info("the flaky step, attempt %d", ctx.attempt)
        if ctx.attempt < 2:
            raise TaskError("not_yet", "the first attempt fails", retryable=True)
        return ctx.attempt

    counted = await ctx.step("count", _tally, payload["tally"], "count")
    attempt = await ctx.step("flaky", flaky)
    return {"counted": counted, "attempt": attempt}


@task("tests.durable-parent")
async def durable_parent(payload: Any, ctx: TaskContext) -> None:
    """Wait on a child that takes long, or sleep: the test cancels it meanwhile."""
    if payload.get("child"):
        await ctx.trigger_and_wait("sleep", {"seconds": payload["child"]})
    await ctx.sleep(float(payload.get("sleep", 0)))
    await ctx.step("after", _tally, payload["tally"], "after")


@task("tests.traced")
async def traced(payload: Any, ctx: TaskContext) -> dict[str, Any]:
    """A durable step and a log line: what a run's trace shows."""

    def prepare() -> int:
        ctx.logger.info("preparing")
        return 41

    prepared = await ctx.step("prepare", prepare)
    return {"answer": prepared + 1}
