"""One attempt of one run: the ``run_task`` arq job.

It reports ``started``, calls the task (its payload parsed, its durable steps
replayed, its log lines kept, within ``max_duration``), and reports how the
attempt ended: ``completed``, ``failed`` (with a clear ``error.code``, never an
exception out of the job) or ``waiting``. ``jobs.worker`` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from typing import Any

from pydantic import BaseModel, ValidationError

from jobs import tracing
from jobs.liveness.heartbeat import Heartbeats
from jobs.protocol import (
    TIMED_OUT_CODE,
    WORKFLOW_TASK,
    JSONRefused,
    clean_text,
    dumps,
)
from jobs.report import Reporter, ReportRejected, make_event, refused_fallback
from jobs.runs.durable import Steps, Suspend
from jobs.runs.media import Media
from jobs.runs.runlog import FLUSH_BYTES, RunLog, RunLogger
from jobs.settings import Settings
from jobs.tasks.registry import TaskContext, TaskError
from jobs.tasks.workflow import Waiting, WorkflowFailed
from webhooks.ssrf import parse_networks

__all__ = ["MAX_ERROR_MESSAGE", "run_task"]

log = logging.getLogger("jobs.attempt")


#: Error messages are cut to this many characters (they are for people).
MAX_ERROR_MESSAGE = 4000


def _error(code: str, message: str, *, retryable: bool = False) -> dict[str, Any]:
    # A task's message may hold anything (NUL, lone surrogates from a decoded
    # file name): it is text for a person, so it is cleaned, never refused.
    return {"code": code, "message": clean_text(message, MAX_ERROR_MESSAGE), "retryable": retryable}


async def _execute(
    ctx: dict[str, Any],
    run_id: str,
    task: str,
    payload: Any,
    attempt: int,
    state: dict[str, Any] | None,
    run_log: RunLog,
    *,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """Run the task; return the fields of the final event (never raises for
    the task's own failures, so one bad run never takes the worker down)."""
    settings: Settings = ctx["settings"]
    definition = ctx["registry"].get(task)
    if definition is None:
        return {
            "type": "failed",
            "error": _error("unknown_task", f"this worker has no task named {task!r}"),
        }
    try:
        parsed = definition.parse_payload(payload)
    except ValidationError as exc:
        return {
            "type": "failed",
            "error": _error("invalid_payload", f"payload does not fit task {task!r}: {exc}"),
        }
    steps = Steps(
        state if task != WORKFLOW_TASK else None,
        run_id=run_id,
        reporter=ctx["reporter"],
        tasks=ctx["registry"],
        max_output_bytes=settings.max_output_bytes,
    )
    task_ctx = TaskContext(
        run_id=run_id,
        task=task,
        attempt=attempt,
        worker_id=ctx["worker_id"],
        logger=RunLogger(
            logging.getLogger(f"jobs.task.{task}"),
            # The trace ID goes into each line's fields (and the worker's own log).
            {"run_id": run_id, "task": task, "attempt": attempt}
            | ({"trace_id": trace_id} if trace_id else {}),
            run_log,
        ),
        settings=settings,
        media=Media(
            run_id=run_id,
            reporter=ctx["reporter"],
            http=ctx["webhook_http"],
            allowed=parse_networks(settings.webhook_allowed_networks),
            max_bytes=settings.image_max_bytes,
            timeout=settings.image_download_timeout,
        ),
        workflow=state if task == WORKFLOW_TASK else None,
        steps=steps,
    )
    result = await _call(ctx, definition.fn, parsed, task_ctx, run_log)
    if steps.suspended is not None:  # also if the task swallowed the Suspend
        return steps.waiting()
    if steps.records:
        result["steps"] = steps.records
    return result


async def _call(
    ctx: dict[str, Any], fn: Any, parsed: Any, task_ctx: TaskContext, run_log: RunLog
) -> dict[str, Any]:
    """Call the task; the fields of its final event."""
    settings: Settings = ctx["settings"]
    run_id, task = task_ctx.run_id, task_ctx.task
    try:
        output = await fn(parsed, task_ctx)
    except Suspend:
        return {"type": "waiting"}
    except WorkflowFailed as exc:
        return {
            "type": "failed",
            "error": _error(exc.code, exc.message),
            "output": exc.output,
        }
    except TaskError as exc:
        return {"type": "failed", "error": _error(exc.code, exc.message, retryable=exc.retryable)}
    except Exception as exc:
        log.exception("task %s of run %s raised", task, run_id)
        run_log.add(
            logging.ERROR,
            f"the task raised {type(exc).__name__}: {exc}\n"
            + "".join(traceback.format_exception(exc)).rstrip(),
            {"exception": type(exc).__name__},
        )
        return {
            "type": "failed",
            "error": _error("task_exception", f"{type(exc).__name__}: {exc}", retryable=True),
        }
    if isinstance(output, Waiting):
        return {
            "type": "waiting",
            "spawn": output.spawn,
            "nodes": output.nodes,
            "waits": output.waits,
        }
    if isinstance(output, BaseModel):  # a task's typed output (``@task(output=...)``)
        output = output.model_dump(mode="json")
    try:
        size = len(dumps(output))
    except JSONRefused as exc:
        return {
            "type": "failed",
            "error": _error("output_not_serializable", f"task output cannot be stored: {exc}"),
        }
    except (TypeError, ValueError) as exc:
        return {
            "type": "failed",
            "error": _error("output_not_serializable", f"task output is not JSON: {exc}"),
        }
    if size > settings.max_output_bytes:
        return {
            "type": "failed",
            "error": _error(
                "output_too_large",
                f"task output is {size} bytes; MAX_OUTPUT_BYTES is {settings.max_output_bytes}",
            ),
        }
    return {"type": "completed", "output": output}


async def run_task(
    ctx: dict[str, Any],
    run_id: str,
    task: str,
    payload: Any,
    attempt: int = 1,
    step: int = 0,
    state: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> str:
    """arq job: one attempt of one run (or one step of a workflow), bracketed
    by ``started`` and a final (or ``waiting``) event."""
    heartbeats: Heartbeats = ctx["heartbeats"]
    heartbeats.add(run_id, attempt, step)
    try:
        with tracing.span(
            f"run {task}",
            parent=(options or {}).get("traceparent"),
            kind="consumer",
            attributes={
                "gateway.run_id": run_id,
                "gateway.task": task,
                "gateway.attempt": attempt,
                "gateway.step": step or None,
                "gateway.worker_id": ctx["worker_id"],
            },
        ) as span:
            outcome = await _run_attempt(
                ctx, run_id, task, payload, attempt, step, state, options, span
            )
            if span is not None:
                span.set_attribute("gateway.outcome", outcome)
            return outcome
    finally:
        heartbeats.discard(run_id, attempt, step)


async def _run_attempt(
    ctx: dict[str, Any],
    run_id: str,
    task: str,
    payload: Any,
    attempt: int,
    step: int,
    state: dict[str, Any] | None,
    options: dict[str, Any] | None,
    span: Any = None,
) -> str:
    reporter: Reporter = ctx["reporter"]
    ids: dict[str, Any] = {
        "run_id": run_id,
        "attempt": attempt,
        "step": step,
        "worker_id": ctx["worker_id"],
    }
    traceparent = tracing.traceparent_of(span)
    if traceparent is not None:  # the gateway's span of a report hangs under this attempt's
        ids["traceparent"] = traceparent
    try:
        ack = await reporter.report(make_event("started", **ids), ctx["redis"])
    except ReportRejected as exc:
        log.error("run %s: the gateway refused its start (%s); not executing it", run_id, exc)
        return "refused"
    log.info(
        "run %s started",
        run_id,
        extra={"run_id": run_id, "task": task, "attempt": attempt, "event": "started"},
    )
    if ack is not None and not ack.get("proceed", True):
        log.info("run %s is %s; not executing it", run_id, ack.get("status"))
        return f"skipped ({ack.get('status')})"
    max_duration = (options or {}).get("max_duration")
    settings: Settings = ctx["settings"]
    run_log = RunLog(
        run_id,
        attempt,
        reporter.send_once,
        max_lines=settings.run_log_max_lines,
        # The gateway takes a report of MAX_OUTPUT_BYTES and 64 KB more.
        max_batch_bytes=min(FLUSH_BYTES, settings.max_output_bytes // 2),
    )
    try:
        async with asyncio.timeout(max_duration):
            result = await _execute(
                ctx,
                run_id,
                task,
                payload,
                attempt,
                state,
                run_log,
                trace_id=tracing.trace_id_of((options or {}).get("traceparent")),
            )
    except TimeoutError:
        result = {
            "type": "failed",
            "error": _error(
                TIMED_OUT_CODE, f"the attempt ran past max_duration ({max_duration} s)"
            ),
        }
    # Until the final report is heard (a gateway away can take a while) the
    # attempt is still this worker's: it beats on meanwhile (``run_task``).
    await run_log.close()  # its lines are in before the run is final
    event_type = result.pop("type")
    error = result.get("error") or {}
    if error:
        tracing.error(span, error.get("code", ""), error.get("message", ""))
    log.info(
        "run %s %s%s",
        run_id,
        event_type,
        f" ({error.get('code')})" if error else "",
        extra={
            "run_id": run_id,
            "task": task,
            "attempt": attempt,
            "event": event_type,
            "error_code": error.get("code"),
        },
    )
    final = make_event(event_type, **ids, **result)
    try:
        await reporter.report(final, ctx["redis"])
    except ReportRejected as exc:
        # Refused for good (an output the gateway will not store, a setting
        # that differs between the two sides): the run must still end.
        log.error("run %s: the gateway refused the %s report: %s", run_id, event_type, exc)
        fallback = refused_fallback(final, exc)
        if fallback is not None:
            with contextlib.suppress(ReportRejected):
                await reporter.report(fallback, ctx["redis"])
        return f"refused ({event_type})"
    return str(event_type)
