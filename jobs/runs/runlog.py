"""A task's own log lines, kept with its run: ``ctx.logger`` writes to the
worker's log as any logger does, and its lines also go to the gateway.

Lines are shipped in the background, in batches (a batch leaves once
``FLUSH_LINES`` lines or ``FLUSH_BYTES`` wait, or ``FLUSH_SECONDS`` after the
first), inside the worker's batched, signed reports: logging never waits on
the network. When the attempt ends, what is still waiting is sent before the
final report, so a run's lines are in the database before it is final.

What a task logs never grows the worker without bound:

- an attempt ships at most ``RUN_LOG_MAX_LINES`` lines (the run keeps no more);
- a line's message is cut to ``MAX_LOG_MESSAGE`` characters and its ``extra``
  to ``MAX_FIELDS_BYTES`` of JSON;
- at most ``MAX_WAITING_BYTES`` wait and ``MAX_SENDING`` batches are out at
  once; a task logging faster than the gateway takes its lines loses the rest;
- a batch the gateway finds too large (413) is split; one it does not take
  after a few tries is dropped.

Every line left out is counted, and the count reaches the run as its
``dropped`` line (``gateway.runlogs.logs``), so nothing is lost without a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import json
import logging
import secrets
import threading
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from jobs.protocol import MAX_LOG_MESSAGE, RUN_LOGS, clean_text, dumps

__all__ = ["CURRENT_STEP", "RunLog", "RunLogger"]

log = logging.getLogger("jobs.runlog")

#: A batch leaves once this many lines (or bytes) wait, or this long after the first.
FLUSH_LINES = 100
FLUSH_BYTES = 256 * 1024
FLUSH_SECONDS = 0.2
#: A line's ``extra`` is cut to this much JSON.
MAX_FIELDS_BYTES = 8 * 1024
#: Lines waiting to leave, and batches out at once, at most; more is dropped.
MAX_WAITING_BYTES = 4 * 1024 * 1024
MAX_SENDING = 4
#: The key of the durable step running now (``jobs.runs.durable``): a line logged
#: inside it says so in its ``step`` field.
CURRENT_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_step", default=None
)
#: An attempt's lines, when not told otherwise (``RUN_LOG_MAX_LINES``).
DEFAULT_MAX_LINES = 5000
#: Tries of one batch before it is dropped.
TRIES = 3
#: How long the end of an attempt waits for its last lines to be heard.
CLOSE_SECONDS = 5.0

_LEVELS = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}
#: ``LogRecord`` attributes that are not a caller's ``extra``.
_RESERVED = frozenset(
    {"run_id", "task", "attempt", "exc_info", "stack_info", "stacklevel", "extra"}
)


#: Names ``extra`` may not use with the standard library's logging.
_RECORD_ATTRIBUTES = frozenset({*logging.makeLogRecord({}).__dict__, "message", "asctime"}) - {
    "run_id",
    "task",
    "attempt",
}


def _level(number: int) -> str:
    for threshold in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if number >= threshold:
            return _LEVELS[threshold]
    return "DEBUG"


def _jsonable(fields: dict[str, Any]) -> dict[str, Any] | None:
    """``extra`` as JSON a database stores (anything else as its ``str``), at
    most ``MAX_FIELDS_BYTES`` of it: a value that does not fit is cut to a
    string, and fields past the budget are named in ``_truncated``."""
    if not fields:
        return None
    try:
        text = json.dumps(fields, default=str, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps({k: str(v) for k, v in fields.items()})
    clean = {
        clean_text(k, 200): (clean_text(v) if isinstance(v, str) else v)
        for k, v in json.loads(text).items()
    }
    if len(text) <= MAX_FIELDS_BYTES:
        return clean
    kept: dict[str, Any] = {}
    left_out: list[str] = []
    budget = MAX_FIELDS_BYTES - 512  # room for the names left out
    for key, value in clean.items():
        encoded = json.dumps(value)
        if len(encoded) > MAX_FIELDS_BYTES // 4:
            value = encoded[: MAX_FIELDS_BYTES // 4] + "…"
            encoded = json.dumps(value)
        if len(encoded) + len(key) + 6 > budget:
            left_out.append(key)
            continue
        kept[key] = value
        budget -= len(encoded) + len(key) + 6
    if left_out:
        kept["_truncated"] = left_out[:20]
    return kept


class RunLog:
    """The lines of one attempt, on their way to the gateway.

    :param send: sends one report (a ``run.logs`` batch item) and returns the answer
    :param max_lines: lines this attempt ships at most (``RUN_LOG_MAX_LINES``)
    :param max_batch_bytes: a batch's size at most (below the gateway's limit
        on a report, which follows ``MAX_OUTPUT_BYTES``)
    """

    def __init__(
        self,
        run_id: str,
        attempt: int,
        send: Callable[[dict[str, Any]], Awaitable[Any]],
        *,
        max_lines: int = DEFAULT_MAX_LINES,
        max_batch_bytes: int = FLUSH_BYTES,
    ) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.max_lines = max_lines
        self.max_batch_bytes = max_batch_bytes
        self._send = send
        # A plain ``def`` task logs from a thread: the counters and the
        # waiting lines are shared with it under this lock.
        self._lock = threading.Lock()
        self._waiting: list[dict[str, Any]] = []
        self._waiting_bytes = 0
        self._taken = 0
        self._wake_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        #: Lines the gateway took, and lines left out (cap, backlog, refusals).
        self.sent = self.dropped = 0
        #: Of ``dropped``, those the gateway has not been told of yet.
        self._unreported = 0
        self._loop = asyncio.get_running_loop()

    def add(self, level: int, message: str, fields: dict[str, Any] | None = None) -> None:
        """Keep a line; it leaves with the next batch. Safe from any thread.
        Past the cap or the backlog the line is only counted."""
        with self._lock:
            if self._taken >= self.max_lines or self._waiting_bytes >= MAX_WAITING_BYTES:
                self._drop(1)
                return
            self._taken += 1
        text = clean_text(message, MAX_LOG_MESSAGE)
        kept_fields = _jsonable(fields or {})
        line = {
            "ts": dt.datetime.now(dt.UTC).isoformat(),
            "level": _level(level),
            "message": text,
            "fields": kept_fields,
        }
        size = len(dumps(line))
        with self._lock:
            self._waiting.append({"line": line, "size": size})
            self._waiting_bytes += size
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            try:
                on_loop = asyncio.get_running_loop() is self._loop
            except RuntimeError:
                on_loop = False
            if on_loop:
                self._woken()
            else:
                self._loop.call_soon_threadsafe(self._woken)

    def _drop(self, count: int) -> None:
        """Count lines left out (under the lock)."""
        self.dropped += count
        self._unreported += count

    def _woken(self) -> None:
        with self._lock:
            self._wake_pending = False
            full = len(self._waiting) >= FLUSH_LINES or self._waiting_bytes >= self.max_batch_bytes
        if full:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_SECONDS, self._flush)

    def _take_batch(self, *, final: bool) -> tuple[list[dict[str, Any]], int] | None:
        """The next batch (its lines, and the drops to report with it), or
        ``None`` when there is nothing to send."""
        with self._lock:
            lines: list[dict[str, Any]] = []
            size = 0
            while self._waiting and len(lines) < FLUSH_LINES:
                entry = self._waiting[0]
                if lines and size + entry["size"] > self.max_batch_bytes:
                    break
                self._waiting.pop(0)
                self._waiting_bytes -= entry["size"]
                size += entry["size"]
                lines.append(entry["line"])
            # Drops go with the batch that empties the buffer, so the run's
            # count comes after every line that was kept.
            dropped = 0 if self._waiting else self._unreported
            if not lines and not (final and dropped):
                return None
            self._unreported -= dropped
            return lines, dropped

    def _flush(self, *, final: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while len(self._sending) < MAX_SENDING or final:
            batch = self._take_batch(final=final)
            if batch is None:
                return
            task = self._loop.create_task(self._ship(*batch))
            self._sending.add(task)
            task.add_done_callback(self._sent)
        # Batches are out at the limit: what waits leaves as one comes back.

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        with self._lock:
            more = bool(self._waiting)
        if more:
            self._flush()

    async def _ship(self, lines: list[dict[str, Any]], dropped: int) -> None:
        item: dict[str, Any] = {
            "type": RUN_LOGS,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "batch": secrets.token_hex(12),
            "lines": lines,
        }
        if dropped:
            item["dropped"] = dropped
        for attempt in range(TRIES):
            try:
                await self._send(item)
                self.sent += len(lines)
                return
            except Exception as exc:  # never the task's problem
                too_large = getattr(exc, "status_code", None) == 413
                if too_large and len(lines) > 1:
                    # Too large for the gateway's body limit: in halves.
                    half = len(lines) // 2
                    await self._ship(lines[:half], dropped)
                    await self._ship(lines[half:], 0)
                    return
                if too_large or attempt == TRIES - 1:
                    with self._lock:
                        self._drop(len(lines) + dropped)
                        self.dropped -= dropped  # counted once already
                    log.warning(
                        "run %s: %d log line(s) not shipped: %s", self.run_id, len(lines), exc
                    )
                    return
                await asyncio.sleep(0.2 * (attempt + 1))

    async def close(self) -> None:
        """Send what waits, with the count of what was left out, and wait (a
        while) for every batch to be heard."""
        await asyncio.sleep(0)  # lines handed over from a thread come in first
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
                while True:
                    self._flush(final=True)
                    if not self._sending:
                        return
                    await asyncio.gather(*self._sending, return_exceptions=True)


class RunLogger(logging.LoggerAdapter[logging.Logger]):
    """``ctx.logger``: logs with ``run_id``, ``task`` and ``attempt`` on every
    line, as any logger, and keeps each line with the run (:class:`RunLog`).

    ``extra`` becomes the line's ``fields``; ``exc_info`` adds the traceback
    to its message.
    """

    def __init__(self, logger: logging.Logger, context: dict[str, Any], run_log: RunLog) -> None:
        super().__init__(logger, context)
        self.run_log = run_log

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **(self.extra or {})}
        return msg, kwargs

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        try:
            message = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):  # the format and its arguments do not match
            message = f"{msg} {args!r}"
        exc_info = kwargs.get("exc_info")
        if exc_info:
            if exc_info is True:
                message += "\n" + traceback.format_exc().rstrip()
            elif isinstance(exc_info, BaseException):
                message += "\n" + "".join(traceback.format_exception(exc_info)).rstrip()
        extra = kwargs.get("extra") or {}
        fields = {k: v for k, v in extra.items() if k not in _RESERVED}
        step = CURRENT_STEP.get()
        if step is not None:
            fields.setdefault("step", step)
        trace_id = (self.extra or {}).get("trace_id")
        if trace_id is not None:
            fields.setdefault("trace_id", trace_id)
        self.run_log.add(level, message, fields)
        # The run keeps every field; the worker's own log gets those that do
        # not clash with a LogRecord's attributes (``thread``, ``name``, …),
        # which logging refuses with a KeyError that would end the task.
        kwargs["extra"] = {k: v for k, v in extra.items() if k not in _RECORD_ATTRIBUTES}
        super().log(level, msg, *args, **kwargs)
