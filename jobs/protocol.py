"""The worker ↔ gateway protocol: what both sides import, so neither reaches into the other.

- **Internal paths** the worker calls on the gateway, the **events** it reports
  (:class:`WorkerEvent`), the **job IDs** the gateway queues runs and callback
  attempts under, the **codes** both sides give meaning to, and the **nudge**
  channel on which the gateway wakes idle workers.
- **Request signatures**: an itsdangerous :class:`~itsdangerous.TimestampSigner`
  signature over the request's method, path, query string and the SHA-256 of its
  body. A captured request cannot be replayed to another path, method or query
  (docs/architecture.md, "Signing"); the body stays plain JSON (or the raw file
  of an artifact upload).
- **JSON both databases can store**: strict JSON (no ``NaN``, ``Infinity`` or
  ``1e999``), with no NUL character and no lone surrogate in any string or key.
  PostgreSQL refuses NUL in text and JSONB, and a lone surrogate cannot be
  encoded as UTF-8, so either would be accepted by one backend and break reads
  on the other. :func:`loads` and :func:`dumps` refuse them with the path at fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, Literal

import orjson
from arq.connections import RedisSettings
from itsdangerous import BadSignature, SignatureExpired, TimestampSigner
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = [
    "ARTIFACTS_PATH",
    "ARTIFACT_FETCH_PATH",
    "EVENTS_PATH",
    "MAX_LOG_MESSAGE",
    "PREPARE_PATH",
    "REDIS_DOWN",
    "RUN_LOGS",
    "SIGNATURE_HEADER",
    "STEP_KINDS",
    "TIMED_OUT_CODE",
    "WAITPOINTS_PATH",
    "WORKERS_PATH",
    "WORKFLOW_TASK",
    "ChildRun",
    "JSONRefused",
    "LogLine",
    "RedisOutage",
    "RunLogs",
    "SignatureError",
    "StepRecord",
    "WaitNode",
    "WorkerError",
    "WorkerEvent",
    "WorkerPresence",
    "clean_text",
    "delivery_job_id",
    "dumps",
    "find_nonfinite",
    "find_unstorable",
    "listen_forever",
    "loads",
    "nudge_channel",
    "nudge_due",
    "parse_run_job_id",
    "redis_database",
    "redis_settings",
    "run_job_id",
    "sign_request",
    "verify_request",
]

log = logging.getLogger("jobs.protocol")

EVENTS_PATH = "/internal/v1/events"
PREPARE_PATH = "/internal/v1/deliveries/prepare"
ARTIFACTS_PATH = "/internal/v1/artifacts"
ARTIFACT_FETCH_PATH = "/internal/v1/artifacts/fetch"
WAITPOINTS_PATH = "/internal/v1/waitpoints"
WORKERS_PATH = "/internal/v1/workers"

#: The task that runs a workflow graph: its runs wait (WAITING) for children.
WORKFLOW_TASK = "execute-workflow"
#: The error code of an attempt stopped at ``options.max_duration``: the worker
#: reports it, and the gateway ends the run TIMED_OUT for it (no retry).
TIMED_OUT_CODE = "max_duration_exceeded"


# -- events and job IDs -----------------------------------------------------------


class WorkerError(BaseModel):
    code: str = Field(max_length=100)
    message: str
    retryable: bool = False


class ChildRun(BaseModel):
    """A node of a workflow that a step starts as a child run, or a durable
    task's child (``trigger_and_wait``: ``node_id`` is the step's key)."""

    node_id: str = Field(min_length=1, max_length=200)
    task: str = Field(min_length=1, max_length=200)
    payload: Any = None
    #: A durable task's child: the trigger options it gives (the gateway
    #: checks them as a trigger's); ``None`` for a workflow's node.
    options: dict[str, Any] | None = None


class WaitNode(BaseModel):
    """What a run waits on: a workflow's ``wait`` node (completed by a POST,
    or failed after ``timeout`` seconds), a ``delay`` node or a durable
    ``sleep`` (completed after ``seconds``, or at ``until``), or a durable
    task's ``token`` step (the waitpoint ``waitpoint_id``)."""

    node_id: str = Field(min_length=1, max_length=200)
    kind: Literal["wait", "delay", "token"]
    timeout: float | None = Field(default=None, gt=0, le=365 * 24 * 3600)
    seconds: float | None = Field(default=None, ge=0, le=365 * 24 * 3600)
    until: str | None = Field(default=None, max_length=64)
    #: What the node's input edge gave it, for a ``delay`` to pass on.
    value: Any = None
    waitpoint_id: str | None = Field(default=None, max_length=40)


#: What a durable task's step is (``jobs.runs.durable``).
STEP_KINDS = ("step", "child", "batch", "sleep", "waitpoint", "token")


class StepRecord(BaseModel):
    """A durable task's step as an execution left it (``jobs.runs.durable``): the
    gateway keeps it with the run, and the next execution gets it back."""

    key: str = Field(min_length=1, max_length=200)
    kind: Literal["step", "child", "batch", "sleep", "waitpoint", "token"]
    position: int = Field(ge=0, le=100_000)
    status: Literal["running", "waiting", "completed", "failed"]
    output: Any = None
    error: WorkerError | None = None
    started_at: str | None = Field(default=None, max_length=64)
    finished_at: str | None = Field(default=None, max_length=64)


class WorkerEvent(BaseModel):
    """A signed report from a worker (``jobs.report``) about one run's attempt."""

    type: Literal["started", "completed", "failed", "waiting", "heartbeat"]
    run_id: str = Field(max_length=40)
    attempt: int = Field(ge=1)
    #: A workflow's step; 0 for every other run.
    step: int = Field(default=0, ge=0)
    worker_id: str | None = Field(default=None, max_length=200)
    #: The attempt's span (``jobs.tracing``), when traces are on.
    traceparent: str | None = Field(default=None, max_length=64)
    occurred_at: str | None = None
    output: Any = None
    error: WorkerError | None = None
    #: ``waiting`` only: the children to start and the nodes' states.
    spawn: list[ChildRun] = Field(default_factory=list, max_length=200)
    nodes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: ``waiting`` only: the wait and delay nodes to set waiting.
    waits: list[WaitNode] = Field(default_factory=list, max_length=200)
    #: A durable task's steps that this execution did or began (any closing
    #: report: ``waiting``, ``completed``, ``failed``).
    steps: list[StepRecord] = Field(default_factory=list, max_length=1000)


class WorkerPresence(BaseModel):
    """A worker process saying it is there, every ``HEARTBEAT_INTERVAL``
    (``jobs.liveness.heartbeat``), and once more when it stops: what
    ``GET /api/v1/workers`` lists."""

    id: str = Field(min_length=1, max_length=200)
    host: str = Field(max_length=255)
    pid: int = Field(ge=0)
    version: str = Field(max_length=64)
    queue: str = Field(max_length=200)
    tasks: list[str] = Field(default_factory=list, max_length=10_000)
    slots: int = Field(ge=0)
    slots_in_use: int = Field(ge=0)
    #: The runs it holds an attempt of.
    runs: list[str] = Field(default_factory=list, max_length=10_000)
    started_at: str = Field(max_length=64)
    state: Literal["running", "stopped"] = "running"


#: The ``type`` of a batch item that carries a run's log lines.
RUN_LOGS = "run.logs"
#: A log line's message is cut to this many characters.
MAX_LOG_MESSAGE = 16 * 1024


class LogLine(BaseModel):
    """A line a task logged: when, how loud, what, and the ``extra`` it gave."""

    ts: str = Field(max_length=64)
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    message: str = Field(max_length=MAX_LOG_MESSAGE)
    fields: dict[str, Any] | None = None


class RunLogs(BaseModel):
    """Log lines of one run's attempt, shipped in a batch of reports
    (:class:`jobs.runs.runlog.RunLog`); ``batch`` and each line's place in it make
    a key, so a batch sent twice is kept once."""

    type: Literal["run.logs"]
    run_id: str = Field(max_length=40)
    attempt: int = Field(ge=1)
    batch: str = Field(min_length=1, max_length=40)
    lines: list[LogLine] = Field(max_length=500)
    #: Lines the worker left out since its last batch (its cap, a backlog,
    #: batches the gateway refused): counted on the run's ``dropped`` line.
    dropped: int = Field(default=0, ge=0)


def run_job_id(run_id: str, attempt: int = 1, step: int = 0) -> str:
    """The arq ``_job_id`` of a run's attempt (and workflow step)."""
    if step:
        return f"{run_id}:{attempt}:s{step}"
    return run_id if attempt == 1 else f"{run_id}:{attempt}"


def parse_run_job_id(job_id: str) -> tuple[str, int, int] | None:
    """``(run_id, attempt, step)`` of a :func:`run_job_id`; ``None`` for any
    other job (a report's, a callback's)."""
    parts = job_id.split(":")
    if not parts[0].startswith("run_") or len(parts) > 3:
        return None
    try:
        attempt = int(parts[1]) if len(parts) > 1 else 1
        step = int(parts[2].removeprefix("s")) if len(parts) > 2 else 0
    except ValueError:
        return None
    return parts[0], attempt, step


def delivery_job_id(delivery_id: str, step: int) -> str:
    """The arq ``_job_id`` of a delivery's scheduled attempt number ``step``."""
    return f"webhook:{delivery_id}:{step}"


# -- nudges -----------------------------------------------------------------------


def nudge_channel(queue_name: str, database: int = 0) -> str:
    """Where a job queued for now is announced, so an idle worker takes it at
    once instead of at its next poll (:class:`jobs.worker.NudgedWorker`). The
    message is the job's ID and, after a space, when it is due (its score in
    the queue, ms): a project's turn can put it a few ms ahead.

    Redis's channels are the server's, not a database's: the channel names
    the queue's ``database`` (past 0), so gateways on other databases of the
    same server never wake this queue's workers, nor count as its listeners."""
    return f"{queue_name}:nudge" if not database else f"{queue_name}:nudge:db{database}"


def redis_database(redis: Any) -> int:
    """The database a Redis client (redis-py's, or arq's pool) talks to: the
    one its queues' nudges name (:func:`nudge_channel`)."""
    return int(redis.connection_pool.connection_kwargs.get("db") or 0)


def nudge_due(message: str) -> int | None:
    """When the job a nudge announces is due (ms since the epoch), or
    ``None`` if the message does not say (a nudge of an older gateway)."""
    _, _, due = message.partition(" ")
    try:
        return int(due)
    except ValueError:
        return None


#: What a lost Redis raises (redis-py's errors, or the socket's own).
REDIS_DOWN = (RedisError, OSError)


#: ``REDIS_URL`` query parameters for TLS (``rediss://``), as redis-py names them.
_TLS_PARAMETERS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


def redis_settings(url: str) -> RedisSettings:
    """arq's settings for ``REDIS_URL``, the gateway's and the workers' alike.

    ``rediss://`` is TLS, and its query may name what redis-py's own URLs do:
    ``ssl_ca_certs`` (a CA of your own), ``ssl_certfile`` and ``ssl_keyfile``
    (a client certificate), ``ssl_cert_reqs`` (``required``, the default, or
    ``none``) and ``ssl_check_hostname`` (``true``, the default on ``rediss``,
    or ``false``). arq's ``from_dsn`` reads none of them.
    """
    settings = RedisSettings.from_dsn(url)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).items()}
    if not settings.ssl:
        return settings
    tls: dict[str, Any] = {name: query[name] for name in _TLS_PARAMETERS if name in query}
    tls["ssl_check_hostname"] = query.get("ssl_check_hostname", "true").lower() in ("1", "true")
    if tls.get("ssl_cert_reqs") == "none":
        tls["ssl_check_hostname"] = False
    return dataclasses.replace(settings, **tls)


class RedisOutage:
    """Waits between tries while Redis does not answer: backoff from
    ``first`` to ``longest`` seconds, one warning when an outage begins and
    one line when it ends (not a line per try)."""

    def __init__(self, what: str, *, first: float = 0.1, longest: float = 5.0) -> None:
        self.what = what
        self.first = first
        self.longest = longest
        self.tries = 0
        self.began = 0.0

    async def wait(self, exc: BaseException) -> None:
        """Note a failed try and sleep before the next one."""
        if not self.tries:
            self.began = time.monotonic()
            log.warning("%s: Redis does not answer (%s); trying until it does", self.what, exc)
        await asyncio.sleep(min(self.longest, self.first * 2**self.tries))
        self.tries += 1

    def over(self) -> None:
        """A try went through: the outage, if there was one, is over."""
        if self.tries:
            log.warning(
                "%s: Redis answers again after %.1f s; resuming",
                self.what,
                time.monotonic() - self.began,
            )
            self.tries = 0


async def listen_forever(
    redis: Redis, channel: str, handle: Callable[[str], None], *, what: str
) -> None:
    """Hand each message on ``channel`` to ``handle`` until cancelled,
    subscribing again after a lost connection (what was sent meanwhile is lost:
    listeners must have another way to catch up, such as polling)."""
    outage = RedisOutage(what, first=0.5)
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            outage.over()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message.get("type") == "message":
                    data = message["data"]
                    handle(data.decode() if isinstance(data, bytes) else str(data))
        except asyncio.CancelledError:
            raise
        except REDIS_DOWN as exc:
            await outage.wait(exc)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


SIGNATURE_HEADER = "gateway-signature"
#: Bumped from v1 (body only) when the signature came to cover the request line.
_SALT = "gateway.worker-request.v2"


# -- request signatures ---------------------------------------------------------


class SignatureError(Exception):
    """A worker request whose signature is missing, wrong or too old.

    :param code: ``invalid_signature`` or ``signature_expired``
    :param message: what is wrong, for the 401 answer
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


def _digest(method: str, path: str, query: str, body: bytes) -> bytes:
    line = f"{method.upper()}\n{path}\n{query}\n".encode("utf-8", "surrogateescape")
    return hashlib.sha256(line + hashlib.sha256(body).digest()).hexdigest().encode()


def sign_request(secret: str, method: str, path: str, query: str, body: bytes) -> str:
    """The signature header's value for this request, valid from now.

    ``path`` is the route's path on the gateway (``EVENTS_PATH``), ``query``
    the query string exactly as sent (``""`` for none).
    """
    return TimestampSigner(secret, salt=_SALT).sign(_digest(method, path, query, body)).decode()


def verify_request(
    secret: str | Sequence[str],
    signature: str | None,
    method: str,
    path: str,
    query: str,
    body: bytes,
    *,
    max_age: int,
) -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs exactly this
    request with ``secret`` (or one of a list of keys: the current one and
    those it replaced) and is at most ``max_age`` seconds old."""
    if not signature:
        raise SignatureError("invalid_signature", f"missing {SIGNATURE_HEADER} header")
    try:
        signed = TimestampSigner(secret, salt=_SALT).unsign(signature, max_age=max_age)
    except SignatureExpired:
        raise SignatureError(
            "signature_expired", f"the request's signature is older than {max_age} s"
        ) from None
    except BadSignature:
        raise SignatureError(
            "invalid_signature", "the request's signature does not match"
        ) from None
    if signed != _digest(method, path, query, body):
        raise SignatureError(
            "invalid_signature",
            "the signature is for another request (method, path, query or body)",
        )


# -- JSON both databases store --------------------------------------------------


class JSONRefused(ValueError):
    """JSON that one of the databases could not store and read back unchanged.

    :param reason: what is wrong (``NUL character``, ``lone surrogate``, ...)
    :param path: where, as a dotted path (``payload.items.3``); ``""`` for the top
    :param not_json: true for what JSON itself does not allow (``NaN``, ``1e999``),
        false for JSON text a database cannot store (NUL, lone surrogates)
    """

    def __init__(self, reason: str, path: str = "", *, not_json: bool = False) -> None:
        self.reason = reason
        self.path = path
        self.not_json = not_json
        super().__init__(f"{path}: {reason}" if path else reason)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRefused(f"the number {text} is out of range", not_json=True)
    return value


def _constant(name: str) -> Any:
    raise JSONRefused(f"{name} is not JSON", not_json=True)


def _string_problem(value: str) -> str | None:
    if "\x00" in value:
        return "a NUL character (\\u0000), which PostgreSQL cannot store"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "a lone surrogate (\\ud800-\\udfff), which is not Unicode text"
    return None


def find_unstorable(value: Any, path: str = "") -> JSONRefused | None:
    """The first string or key in ``value`` that a database cannot store, or ``None``."""
    if isinstance(value, str):
        problem = _string_problem(value)
        return JSONRefused(problem, path) if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and (problem := _string_problem(key)) is not None:
                return JSONRefused(f"a key with {problem}", path)
            found = find_unstorable(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_unstorable(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


#: A ``\u0000`` escape, or an escaped surrogate: only then is a walk needed.
_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89abcdefABCDEF])")
#: Nineteen digits in a row: maybe an integer past 64 bits, which orjson would
#: turn into a float; such a body takes the exact (slower) parser.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def loads(body: bytes) -> Any:
    """Parse strict JSON a database can store.

    :raises JSONRefused: NaN/Infinity, a number out of range, a NUL or a lone surrogate
    :raises ValueError: not JSON at all (``json.JSONDecodeError``, ``UnicodeDecodeError``)
    """
    try:
        if _LONG_DIGITS.search(body) is not None:
            raise ValueError("integers orjson would round")
        value = orjson.loads(body)
    except ValueError:  # the exact parser, which also names what is wrong
        value = json.loads(body, parse_constant=_constant, parse_float=_finite)
    if _SUSPECT.search(body):  # rare: most bodies cost one C-speed search
        found = find_unstorable(value)
        if found is not None:
            raise found
    return value


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of ``value``, refusing what :func:`loads` would refuse.

    :raises JSONRefused: NaN/Infinity, a NUL or a lone surrogate
    :raises TypeError: a value JSON has no form for
    """
    try:
        encoded = orjson.dumps(value)
    except TypeError:
        encoded = b""  # an integer past 64 bits, a lone surrogate, a set: see below
    # orjson writes NaN and Infinity as null: a null sends us looking for them.
    if encoded and b"\\u0000" not in encoded:
        if b"null" not in encoded or find_nonfinite(value) is None:
            return encoded
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        if isinstance(exc, JSONRefused):
            raise
        raise JSONRefused("NaN and Infinity are not JSON", not_json=True) from None
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        encoded = b""
    if not encoded or "\\u0000" in text:
        found = find_unstorable(value)
        if found is not None:
            raise found
    return encoded


def find_nonfinite(value: Any) -> float | None:
    """The first NaN or infinity in ``value``, or ``None``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict | list | tuple):
        for item in items:
            found = find_nonfinite(item)
            if found is not None:
                return found
    return None


def clean_text(value: str, limit: int | None = None) -> str:
    """``value`` as text every database stores: NUL and lone surrogates become
    U+FFFD, and it is cut to ``limit`` characters. For messages and excerpts,
    never for data that must come back unchanged."""
    if limit is not None and len(value) > limit:
        value = value[:limit]
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return value
