"""The task registry: ``@task("name")`` turns an async function into a task.

The gateway and the worker load the same registry: the gateway to refuse an
unknown task (404) and a payload that does not fit the task's model (422)
before anything is queued, the worker to run it.

    from pydantic import BaseModel
    from jobs import task, TaskContext

    class Resize(BaseModel):
        url: str
        width: int

    @task("resize", payload=Resize)
    async def resize(payload: Resize, ctx: TaskContext) -> dict:
        ...
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import inspect
import logging
import re
import typing
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from jobs.settings import ConfigError

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Mapping, Sequence

    from jobs.runs.durable import ChildResult, Steps, Token, TokenResult
    from jobs.runs.media import Media
    from jobs.settings import Settings

__all__ = [
    "TaskContext",
    "TaskDefinition",
    "TaskError",
    "TaskRegistry",
    "load_tasks",
    "registry",
    "task",
]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")

TaskFunction = Callable[[Any, "TaskContext"], Awaitable[Any]]
#: What ``@task`` takes: an async function, or a plain one that runs in a thread.
AnyTaskFunction = Callable[[Any, "TaskContext"], Any]


class TaskError(Exception):
    """A failure a task reports on purpose; it ends the run with ``code``.

    :param code: a short snake_case code, shown as the run's ``error.code``
    :param message: what went wrong, for a person
    :param retryable: whether another attempt could succeed (used by retries)
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        self.code = code
        self.message = message
        self.retryable = retryable
        super().__init__(f"{code}: {message}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskContext:
    """What a running task knows about its run, and the services it may use."""

    run_id: str
    task: str
    attempt: int
    worker_id: str
    #: Logs with ``run_id``, ``task`` and ``attempt`` on every line.
    logger: logging.LoggerAdapter[logging.Logger]
    settings: Settings
    #: Image input and artifact output (see ``jobs.runs.media``).
    media: Media
    #: For a workflow step: the states of its nodes so far.
    workflow: dict[str, Any] | None = None
    #: This execution's durable steps (``jobs.runs.durable``): what the run kept.
    steps: Steps | None = None

    # -- durable steps (jobs.runs.durable: replay with memoization) -----------------

    def _steps(self) -> Steps:
        if self.steps is None:
            raise TaskError("durable_unavailable", "this task context has no durable steps")
        return self.steps

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` (awaited if it gives an awaitable) once
        for this run and keep its JSON result: every later execution gets the
        kept result back without calling ``fn``. If ``fn`` raises, the error is
        recorded on the step and the attempt fails (retried by the run's retry
        policy; a later attempt runs the step again)."""
        return await self._steps().step(name, fn, *args, **kwargs)

    async def trigger_and_wait(
        self, task: str, payload: Any = None, *, name: str | None = None, **options: Any
    ) -> ChildResult:
        """Start a child run of ``task`` (``parent_id`` is this run) and wait
        for its end without holding a slot. A failed child gives a result with
        its ``error``, not an exception (``.unwrap()`` raises one). ``options``
        are a trigger's: ``tags``, ``metadata``, ``queue``, ``concurrency_key``,
        ``priority``, ``max_attempts``, ``retry``, ``max_duration``, ``delay``,
        ``ttl``."""
        return await self._steps().trigger_and_wait(task, payload, name=name, **options)

    async def batch_trigger_and_wait(
        self, items: Sequence[Mapping[str, Any] | tuple[str, Any]], *, name: str | None = None
    ) -> list[ChildResult]:
        """Start a child run per item (``{"task", "payload", "options"}`` or
        ``(task, payload)``), side by side, and wait for all; their results
        in the items' order."""
        return await self._steps().batch_trigger_and_wait(items, name=name)

    async def sleep(self, seconds: float, *, name: str | None = None) -> None:
        """Wait ``seconds`` (up to a year) without holding a slot; survives
        worker and gateway restarts."""
        await self._steps().sleep(seconds, name=name)

    async def sleep_until(self, when: dt.datetime | str, *, name: str | None = None) -> None:
        """Wait until ``when`` (a datetime with a zone, or ISO 8601)."""
        await self._steps().sleep_until(when, name=name)

    async def create_waitpoint(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the waitpoint's, not this call's)
        tags: Sequence[str] = (),
        name: str | None = None,
    ) -> Token:
        """A waitpoint to hand out (``.id``, ``.url``: a POST of any JSON to
        the URL completes it), made once: every execution gets the same one.
        Past ``timeout`` seconds it ends timed out."""
        return await self._steps().create_waitpoint(timeout=timeout, tags=tags, name=name)

    async def wait_for_token(
        self, token: Token | str | Mapping[str, Any], *, name: str | None = None
    ) -> TokenResult:
        """Wait for a waitpoint (this run's ``Token``, or the ID of one made
        through the API) without holding a slot: ``.ok`` and ``.output`` (the
        JSON posted to it), or not ``.ok`` and ``.error`` (it timed out)."""
        return await self._steps().wait_for_token(token, name=name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskDefinition:
    name: str
    fn: TaskFunction
    payload_model: type[BaseModel] | None = None
    #: What the task returns, for the contract (``/openapi.json``, ``GET
    #: /api/v1/tasks``); ``None``: any JSON.
    output_model: type[BaseModel] | None = None
    description: str = ""
    #: Checks beyond the model's; returns 422 details with paths in the payload.
    check: Callable[[Any], list[dict[str, str]]] | None = None
    #: The queue its runs go to unless a trigger names another (default: its name).
    queue: str | None = None
    #: How many of the queue's runs may execute at once, unless the queue was
    #: given a limit through the API (which then wins).
    concurrency_limit: int | None = None

    def parse_payload(self, payload: Any) -> Any:
        """The payload as the task function takes it.

        Raises :class:`pydantic.ValidationError` when it does not fit the model.
        """
        if self.payload_model is None:
            return payload
        return self.payload_model.model_validate(payload)

    def payload_errors(self, payload: Any, prefix: str = "") -> list[dict[str, Any]]:
        """What is wrong with ``payload``, as details whose paths start with
        ``prefix`` (``"payload"``, ``"items.3.payload"``); empty if it fits."""
        try:
            self.parse_payload(payload)
        except ValidationError as exc:
            details = [
                {
                    "path": ".".join(str(p) for p in err["loc"]),
                    "message": err["msg"],
                    "type": err["type"],
                }
                for err in exc.errors(include_url=False, include_input=False)
            ]
        else:
            details = list(self.check(payload)) if self.check is not None else []
        if not prefix:
            return details
        return [{**d, "path": prefix + (f".{d['path']}" if d["path"] else "")} for d in details]

    def payload_schema(self) -> dict[str, Any]:
        """The JSON Schema of the payload (``{}``: anything goes)."""
        return self.payload_model.model_json_schema() if self.payload_model else {}

    def output_schema(self) -> dict[str, Any]:
        """The JSON Schema of the output (``{}``: any JSON)."""
        if self.output_model is None:
            return {}
        return self.output_model.model_json_schema(mode="serialization")


class TaskRegistry:
    """Task definitions by name."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition] = {}

    def register(self, definition: TaskDefinition) -> None:
        if not _NAME.match(definition.name):
            raise ValueError(
                f"task name {definition.name!r} must be 1-100 characters of a-z, 0-9, '.', '_', '-'"
            )
        if definition.queue is not None and not _QUEUE.match(definition.queue):
            raise ValueError(
                f"queue name {definition.queue!r} must be 1-100 characters of "
                "A-Z, a-z, 0-9, '.', '_', ':', '-'"
            )
        if definition.concurrency_limit is not None and definition.concurrency_limit < 1:
            raise ValueError(f"task {definition.name!r}: concurrency_limit must be 1 or more")
        existing = self._tasks.get(definition.name)
        if existing is not None and existing.fn is not definition.fn:
            raise ValueError(f"task {definition.name!r} is registered twice")
        self._tasks[definition.name] = definition

    def get(self, name: str) -> TaskDefinition | None:
        return self._tasks.get(name)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def describe(self) -> list[dict[str, Any]]:
        """Each task's name, description and payload schema, by name."""
        return [
            {
                "name": name,
                "description": self._tasks[name].description,
                "payload_schema": self._tasks[name].payload_schema(),
                "output_schema": self._tasks[name].output_schema(),
                "queue": self._tasks[name].queue or name,
                "concurrency_limit": self._tasks[name].concurrency_limit,
            }
            for name in self.names()
        ]

    def __contains__(self, name: object) -> bool:
        return name in self._tasks


#: The process-wide registry that ``@task`` fills.
registry = TaskRegistry()


def _returned_model(fn: AnyTaskFunction) -> type[BaseModel] | None:
    try:
        returned = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not resolve documents nothing
        return None
    if isinstance(returned, type) and issubclass(returned, BaseModel):
        return returned
    return None


def _in_thread(fn: AnyTaskFunction) -> TaskFunction:
    @functools.wraps(fn)
    async def run(payload: Any, ctx: TaskContext) -> Any:
        return await asyncio.to_thread(fn, payload, ctx)

    return run


def task(
    name: str,
    *,
    payload: type[BaseModel] | None = None,
    output: type[BaseModel] | None = None,
    description: str = "",
    check: Callable[[Any], list[dict[str, str]]] | None = None,
    queue: str | None = None,
    concurrency_limit: int | None = None,
) -> Callable[[AnyTaskFunction], AnyTaskFunction]:
    """Register the decorated function as the task ``name``.

    ``payload`` validates what a trigger sends (the function gets the model);
    ``output`` documents what it returns (it may return the model or a dict
    of its shape), so ``/openapi.json`` types both for other languages. When
    ``output`` is not given and the function's return annotation is a
    pydantic model, that is the output model.

    An ``async def`` runs on the worker's event loop; a plain ``def`` runs in
    a thread, so CPU-bound or blocking work never stalls the worker's other
    runs (nor their heartbeats). Its runs go to ``queue`` (default: a queue
    named after the task); ``concurrency_limit`` caps how many of that queue's
    runs execute at once across every worker, until the API sets another.
    """

    def decorate(fn: AnyTaskFunction) -> AnyTaskFunction:
        registry.register(
            TaskDefinition(
                name=name,
                fn=fn if inspect.iscoroutinefunction(fn) else _in_thread(fn),
                payload_model=payload,
                output_model=output or _returned_model(fn),
                description=description or (fn.__doc__ or "").strip().split("\n")[0],
                check=check,
                queue=queue,
                concurrency_limit=concurrency_limit,
            )
        )
        return fn

    return decorate


def load_tasks(modules: Iterable[str] = ()) -> TaskRegistry:
    """Import the built-in tasks and every module in ``modules`` (``TASK_MODULES``)."""
    for builtin in (
        "jobs.tasks.builtin",
        "jobs.tasks.images",
        "jobs.tasks.llm",
        "jobs.tasks.workflow",
    ):
        importlib.import_module(builtin)
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module + ".").startswith(exc.name + "."):
                raise  # the module is there; something it imports is not
            raise ConfigError(
                "TASK_MODULES",
                f"no module {module!r} on the import path: run the command from the folder "
                "that holds it, or add that folder to PYTHONPATH",
            ) from None
    return registry
