"""Durable steps: a task's own code waits for children, time or a person
without holding a worker slot.

    @task("review")
    async def review(payload: dict, ctx: TaskContext) -> dict:
        crop = (await ctx.trigger_and_wait("crop-image", payload["crop"])).unwrap()
        wp = await ctx.create_waitpoint(timeout=24 * 3600)
        await ctx.step("ask a person", send_mail, payload["to"], wp.url)
        answer = await ctx.wait_for_token(wp)
        return {"crop": crop, "approved": answer.ok and answer.output.get("approved")}

The model is replay with memoization, as in Inngest and Hatchet. When the code
reaches a wait it has no result for, :class:`Suspend` ends this execution and
the worker reports ``waiting`` with the steps it did and what it waits on; the
slot is free. When the wait is over the gateway queues the run again and hands
it the kept steps: the task runs from the top, and every step, child and wait
already done returns its kept result at once, without running again.

The rule that makes this work: **code outside steps takes the same path on
every execution.** Anything that differs between executions (the time, a
random number, a network call, a read of something that changes) goes inside
``ctx.step``, whose result is kept. Each call is checked against the kept
sequence: a step in another place, under another name or of another kind ends
the run with ``error.code`` ``nondeterministic_step``, naming it.

Durable calls are awaited one at a time, from the task itself (not inside a
step's function, not from tasks of its own); ``batch_trigger_and_wait`` runs
children side by side. They need an ``async def`` task.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jobs import tracing
from jobs.protocol import WAITPOINTS_PATH, JSONRefused, clean_text, dumps, loads
from jobs.report import GatewayUnreachable, Reporter, ReportRejected
from jobs.runs.runlog import CURRENT_STEP
from jobs.tasks.registry import TaskError

if TYPE_CHECKING:
    from jobs.tasks.registry import TaskRegistry

__all__ = [
    "CHILD_OPTIONS",
    "ChildResult",
    "ChildRunFailed",
    "NondeterministicStep",
    "Steps",
    "Suspend",
    "Token",
    "TokenResult",
]

#: Trigger options a child may take (``ctx.trigger_and_wait(task, payload, **options)``).
CHILD_OPTIONS = frozenset(
    {
        "tags",
        "metadata",
        "delay",
        "ttl",
        "max_attempts",
        "retry",
        "max_duration",
        "queue",
        "concurrency_key",
        "priority",
    }
)
#: A step's name is at most this long (its key adds ``:n`` and a batch's ``[i]``).
MAX_NAME = 150
#: Children of one ``batch_trigger_and_wait``, at most.
MAX_BATCH = 200
#: The longest sleep.
MAX_SLEEP = 365 * 24 * 3600.0
#: Error codes of a token step that mean the code is wrong, not the wait.
_MISUSED_TOKEN = ("waitpoint_not_found", "waitpoint_taken")


class Suspend(BaseException):
    """This execution ends here: the run waits on ``step`` (the worker reports
    ``waiting``). A :class:`BaseException`, as :class:`asyncio.CancelledError`
    is, so a task's ``except Exception`` never swallows it."""

    def __init__(self, step: str) -> None:
        self.step = step
        super().__init__(f"the run waits at step {step!r}")


class NondeterministicStep(TaskError):
    """The code took another path than the kept one (the determinism rule)."""

    def __init__(self, message: str) -> None:
        super().__init__("nondeterministic_step", message)


@dataclasses.dataclass(frozen=True)
class ChildResult:
    """A child run's end, as ``trigger_and_wait`` gives it: ``ok`` and its
    ``output``, or not ``ok`` and its ``error`` (``{"code", "message"}``)."""

    ok: bool
    id: str | None
    task: str
    output: Any = None
    error: dict[str, Any] | None = None

    def unwrap(self) -> Any:
        """The output; :class:`ChildRunFailed` if the child did not complete."""
        if not self.ok:
            raise ChildRunFailed(self)
        return self.output


class ChildRunFailed(TaskError):
    """``ChildResult.unwrap()`` of a child that did not complete."""

    def __init__(self, result: ChildResult) -> None:
        self.result = result
        error = result.error or {}
        super().__init__(
            "child_run_failed",
            f"child run {result.id} ({result.task}) ended with "
            f"{error.get('code')}: {error.get('message')}",
        )


@dataclasses.dataclass(frozen=True)
class Token:
    """A waitpoint the run made (``ctx.create_waitpoint``): a POST of any JSON
    to ``url`` (no key needed) completes it."""

    id: str
    url: str


@dataclasses.dataclass(frozen=True)
class TokenResult:
    """What ``wait_for_token`` gives: ``ok`` and the JSON posted to the
    waitpoint, or not ``ok`` and why (``waitpoint_timed_out``)."""

    ok: bool
    output: Any = None
    error: dict[str, Any] | None = None

    def unwrap(self) -> Any:
        """The posted JSON; :class:`TaskError` with the error's code otherwise."""
        if not self.ok:
            error = self.error or {}
            raise TaskError(str(error.get("code")), str(error.get("message")))
        return self.output


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _error(code: str, message: str, retryable: bool = False) -> dict[str, Any]:
    return {"code": code, "message": clean_text(message, 4000), "retryable": retryable}


@dataclasses.dataclass
class _Child:
    task: str
    payload: Any
    options: dict[str, Any]


class Steps:
    """One execution's durable calls: what the run kept (``kept``: its steps as
    the gateway hands them back, by key), what this execution did or began
    (:attr:`records`), and what it waits on (:attr:`spawn`, :attr:`waits`)."""

    def __init__(
        self,
        kept: Mapping[str, Mapping[str, Any]] | None,
        *,
        run_id: str,
        reporter: Reporter | None,
        tasks: TaskRegistry | None,
        max_output_bytes: int,
    ) -> None:
        self.run_id = run_id
        self._kept = dict(kept or {})
        self._order = {
            int(row["position"]): key
            for key, row in self._kept.items()
            if row.get("position") is not None
        }
        self._reporter = reporter
        self._tasks = tasks
        self._max_output_bytes = max_output_bytes
        self._position = 0
        self._names: dict[str, int] = {}
        #: The steps to report (``StepRecord``), new or changed.
        self.records: list[dict[str, Any]] = []
        #: Children to start and waitpoints to wait on (``ChildRun``, ``WaitNode``).
        self.spawn: list[dict[str, Any]] = []
        self.waits: list[dict[str, Any]] = []
        #: The step this execution stopped at, if it did.
        self.suspended: str | None = None

    # -- the sequence -------------------------------------------------------------

    def _claim(self, name: Any, kind: str) -> tuple[str, int, Mapping[str, Any] | None]:
        """The next step's key and place, and what the run kept of it."""
        inside = CURRENT_STEP.get()
        if inside is not None:
            raise TaskError(
                "nested_step",
                f"{kind} {name!r} was called inside step {inside!r}: durable calls are "
                "made from the task itself, not from a step's function",
            )
        if self.suspended is not None:
            raise TaskError(
                "concurrent_wait",
                f"{kind} {name!r} was called while the run waits at {self.suspended!r}: "
                "await durable calls one at a time (batch_trigger_and_wait runs children "
                "side by side)",
            )
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            raise TaskError("invalid_step", f"a step's name is text of 1 to {MAX_NAME} characters")
        seen = self._names.get(name, 0)
        self._names[name] = seen + 1
        key = name if seen == 0 else f"{name}:{seen + 1}"
        position = self._position
        self._position += 1
        kept_key = self._order.get(position)
        if kept_key is not None:
            row = self._kept[kept_key]
            if kept_key != key or row.get("kind") != kind:
                raise NondeterministicStep(
                    f"step {position + 1} is {kind} {key!r}, but this run kept {row.get('kind')} "
                    f"{kept_key!r} there: code outside steps must take the same path on every "
                    "execution (put what varies inside ctx.step)"
                )
            return key, position, row
        if key in self._kept:
            raise NondeterministicStep(
                f"{kind} {key!r} comes at step {position + 1}, but this run kept it at step "
                f"{int(self._kept[key].get('position') or 0) + 1}"
            )
        return key, position, None

    def _record(self, key: str, kind: str, position: int, status: str, **fields: Any) -> None:
        self.records.append(
            {"key": key, "kind": kind, "position": position, "status": status, **fields}
        )

    def _suspend(self, key: str) -> Suspend:
        self.suspended = key
        return Suspend(key)

    def _keepable(self, key: str, value: Any) -> Any:
        """``value`` as the run keeps it (a JSON round trip: every execution
        sees the same), or :class:`TaskError` if it cannot be kept."""
        try:
            encoded = dumps(value)
        except (JSONRefused, TypeError, ValueError) as exc:
            raise TaskError(
                "step_output_not_serializable", f"step {key!r} returned what is not JSON: {exc}"
            ) from None
        if len(encoded) > self._max_output_bytes:
            raise TaskError(
                "step_output_too_large",
                f"step {key!r} returned {len(encoded)} bytes; "
                f"MAX_OUTPUT_BYTES is {self._max_output_bytes}",
            )
        return loads(encoded)

    # -- steps --------------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        key, position, kept = self._claim(name, "step")
        if kept is not None and kept.get("status") == "completed":
            return kept.get("output")
        started = _now()
        token = CURRENT_STEP.set(key)
        try:
            with tracing.span(f"step {key}", attributes={"gateway.step": key}) as span:
                try:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                    output = self._keepable(key, result)
                except TaskError as exc:
                    tracing.error(span, exc.code, exc.message)
                    raise
        except Exception as exc:
            error = (
                _error(exc.code, exc.message, exc.retryable)
                if isinstance(exc, TaskError)
                else _error("task_exception", f"{type(exc).__name__}: {exc}", True)
            )
            self._record(
                key, "step", position, "failed", error=error, started_at=started, finished_at=_now()
            )
            raise
        finally:
            CURRENT_STEP.reset(token)
        self._record(
            key,
            "step",
            position,
            "completed",
            output=output,
            started_at=started,
            finished_at=_now(),
        )
        return output

    # -- children -----------------------------------------------------------------

    def _child(self, task: Any, payload: Any, options: Mapping[str, Any], where: str) -> _Child:
        if not isinstance(task, str):
            raise TaskError("unknown_task", f"{where}: a task is named by a string")
        definition = self._tasks.get(task) if self._tasks is not None else None
        if self._tasks is not None and definition is None:
            raise TaskError("unknown_task", f"{where}: there is no task named {task!r}")
        if definition is not None:
            problems = definition.payload_errors(payload)
            if problems:
                raise TaskError(
                    "invalid_payload",
                    f"{where}: the payload does not fit task {task!r}: "
                    + "; ".join(f"{p['path'] or '(payload)'}: {p['message']}" for p in problems),
                )
        unknown = sorted(set(options) - CHILD_OPTIONS)
        if unknown:
            raise TaskError(
                "invalid_child_options",
                f"{where}: a child takes no {', '.join(unknown)}; it takes "
                + ", ".join(sorted(CHILD_OPTIONS)),
            )
        try:
            dumps([payload, dict(options)])
        except (JSONRefused, TypeError, ValueError) as exc:
            raise TaskError("invalid_payload", f"{where}: not JSON: {exc}") from None
        return _Child(task, payload, dict(options))

    def _ended(self, node_id: str, task: str) -> ChildResult | None:
        row = self._kept.get(node_id)
        if row is None or row.get("status") in ("running", "waiting"):
            return None
        if row.get("status") == "completed":
            return ChildResult(True, row.get("run_id"), task, row.get("output"))
        error = row.get("error") or {"code": row.get("status"), "message": "the child ended"}
        return ChildResult(False, row.get("run_id"), task, None, dict(error))

    def _spawn(self, node_id: str, child: _Child) -> None:
        self.spawn.append(
            {
                "node_id": node_id,
                "task": child.task,
                "payload": child.payload,
                "options": child.options,
            }
        )

    async def trigger_and_wait(
        self, task: str, payload: Any = None, *, name: str | None = None, **options: Any
    ) -> ChildResult:
        key, position, kept = self._claim(name or f"trigger:{task}", "child")
        if kept is not None:
            ended = self._ended(key, task)
            if ended is not None:
                return ended
            raise self._suspend(key)
        child = self._child(task, payload, options, f"trigger_and_wait({task!r})")
        self._spawn(key, child)
        self._record(key, "child", position, "running", started_at=_now())
        raise self._suspend(key)

    async def batch_trigger_and_wait(
        self, items: Sequence[Any], *, name: str | None = None
    ) -> list[ChildResult]:
        children = []
        for i, item in enumerate(items):
            where = f"batch_trigger_and_wait item {i}"
            if isinstance(item, Mapping):
                task, payload = item.get("task"), item.get("payload")
                options = dict(item.get("options") or {})
                extra = sorted(set(item) - {"task", "payload", "options"})
                if extra:
                    raise TaskError(
                        "invalid_payload", f"{where}: takes task, payload and options, not {extra}"
                    )
            elif isinstance(item, tuple | list) and len(item) == 2:
                task, payload, options = item[0], item[1], {}
            else:
                raise TaskError(
                    "invalid_payload",
                    f"{where}: give {{'task', 'payload', 'options'}} or (task, payload)",
                )
            children.append((task, payload, options, where))
        if len(children) > MAX_BATCH:
            raise TaskError("batch_too_large", f"a batch has at most {MAX_BATCH} children")
        key, position, kept = self._claim(name or "batch", "batch")
        if kept is not None:
            results = [self._ended(f"{key}[{i}]", str(c[0])) for i, c in enumerate(children)]
            if any(result is None for result in results):
                raise self._suspend(key)
            if kept.get("status") != "completed":
                self._record(key, "batch", position, "completed", finished_at=_now())
            return [result for result in results if result is not None]
        checked = [self._child(*c) for c in children]
        if not checked:
            self._record(key, "batch", position, "completed", started_at=_now(), finished_at=_now())
            return []
        for i, child in enumerate(checked):
            self._spawn(f"{key}[{i}]", child)
        self._record(key, "batch", position, "running", started_at=_now())
        raise self._suspend(key)

    # -- time ---------------------------------------------------------------------

    async def sleep(self, seconds: float, *, name: str | None = None) -> None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not math.isfinite(seconds)
            or not 0 <= seconds <= MAX_SLEEP
        ):
            raise TaskError("invalid_sleep", f"sleep takes 0 to {MAX_SLEEP:.0f} seconds")
        await self._sleep({"seconds": float(seconds)}, name)

    async def sleep_until(self, when: dt.datetime | str, *, name: str | None = None) -> None:
        if isinstance(when, str):
            try:
                when = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
            except ValueError:
                raise TaskError("invalid_sleep", f"sleep_until: {when!r} is not ISO 8601") from None
        if not isinstance(when, dt.datetime) or when.tzinfo is None:
            raise TaskError("invalid_sleep", "sleep_until takes a datetime with a time zone")
        await self._sleep({"until": when.astimezone(dt.UTC).isoformat()}, name)

    async def _sleep(self, wait: dict[str, Any], name: str | None) -> None:
        key, position, kept = self._claim(name or "sleep", "sleep")
        if kept is not None:
            if kept.get("status") in ("running", "waiting"):
                raise self._suspend(key)
            return
        self.waits.append({"node_id": key, "kind": "delay", **wait})
        self._record(key, "sleep", position, "waiting", started_at=_now())
        raise self._suspend(key)

    # -- tokens -------------------------------------------------------------------

    async def create_waitpoint(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the waitpoint's, not this call's)
        tags: Sequence[str] = (),
        name: str | None = None,
    ) -> Token:
        key, position, kept = self._claim(name or "waitpoint", "waitpoint")
        if kept is not None and kept.get("status") == "completed":
            made = kept.get("output") or {}
            return Token(made["id"], made["url"])
        if self._reporter is None:
            raise TaskError("gateway_unavailable", "this task context has no gateway to ask")
        started = _now()
        try:
            made = await self._reporter.call(
                WAITPOINTS_PATH,
                {"run_id": self.run_id, "key": key, "timeout": timeout, "tags": list(tags)},
            )
        except ReportRejected as exc:
            raise TaskError("invalid_waitpoint", f"create_waitpoint: {exc}") from None
        except (GatewayUnreachable, JSONRefused) as exc:
            raise TaskError(
                "gateway_unavailable", f"create_waitpoint: {exc}", retryable=True
            ) from None
        output = {"id": made["id"], "url": made["url"]}
        self._record(
            key,
            "waitpoint",
            position,
            "completed",
            output=output,
            started_at=started,
            finished_at=_now(),
        )
        return Token(output["id"], output["url"])

    async def wait_for_token(
        self, token: Token | str | Mapping[str, Any], *, name: str | None = None
    ) -> TokenResult:
        waitpoint_id = (
            token.id
            if isinstance(token, Token)
            else token.get("id")
            if isinstance(token, Mapping)
            else token
        )
        if not isinstance(waitpoint_id, str) or not waitpoint_id:
            raise TaskError("invalid_waitpoint", "wait_for_token takes a Token or a waitpoint ID")
        key, position, kept = self._claim(name or "token", "token")
        if kept is not None:
            status = kept.get("status")
            if status == "completed":
                return TokenResult(True, kept.get("output"))
            if status in ("running", "waiting"):
                raise self._suspend(key)
            error = dict(kept.get("error") or {"code": status, "message": "the wait ended"})
            if error.get("code") in _MISUSED_TOKEN:
                raise TaskError(str(error["code"]), str(error.get("message")))
            return TokenResult(False, None, error)
        self.waits.append({"node_id": key, "kind": "token", "waitpoint_id": waitpoint_id})
        self._record(key, "token", position, "waiting", started_at=_now())
        raise self._suspend(key)

    # -- the report ---------------------------------------------------------------

    def waiting(self) -> dict[str, Any]:
        """The fields of the ``waiting`` report that ends this execution."""
        return {"type": "waiting", "steps": self.records, "spawn": self.spawn, "waits": self.waits}
