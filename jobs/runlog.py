"""A task's own log lines, kept with its run: ``ctx.logger`` writes to the
worker's log as any logger does, and its lines also go to the gateway.

Lines are shipped in the background, in batches (a batch leaves once
``FLUSH_LINES`` lines are waiting or ``FLUSH_SECONDS`` after the first), inside
the worker's batched, signed reports: logging never waits on the network. When
the attempt ends, what is still waiting is sent before the final report, so a
run's lines are in the database before it is final. A batch the gateway does
not take after a few tries is dropped (a log line is not worth holding a run
for); the gateway caps the lines a run keeps (``RUN_LOG_MAX_LINES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import secrets
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from jobs.protocol import MAX_LOG_MESSAGE, RUN_LOGS, clean_text

__all__ = ["RunLog", "RunLogger"]

log = logging.getLogger("jobs.runlog")

#: A batch leaves once this many lines wait, or this long after the first.
FLUSH_LINES = 100
FLUSH_SECONDS = 0.2
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
    """``extra`` as JSON a database stores (anything else as its ``str``)."""
    if not fields:
        return None
    try:
        text = json.dumps(fields, default=str, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps({k: str(v) for k, v in fields.items()})
    return {
        clean_text(k, 200): (clean_text(v) if isinstance(v, str) else v)
        for k, v in json.loads(text).items()
    }


class RunLog:
    """The lines of one attempt, on their way to the gateway.

    :param send: sends one report (a ``run.logs`` batch item) and returns the answer
    """

    def __init__(
        self, run_id: str, attempt: int, send: Callable[[dict[str, Any]], Awaitable[Any]]
    ) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self._send = send
        self._waiting: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.sent = self.dropped = 0
        # Made on the worker's loop; a task that is a plain ``def`` logs from
        # a thread, and its lines are handed over to this loop.
        self._loop = asyncio.get_running_loop()

    def add(self, level: int, message: str, fields: dict[str, Any] | None = None) -> None:
        """Keep a line; it leaves with the next batch. Safe from any thread."""
        line = {
            "ts": dt.datetime.now(dt.UTC).isoformat(),
            "level": _level(level),
            "message": clean_text(message, MAX_LOG_MESSAGE),
            "fields": _jsonable(fields or {}),
        }
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._keep(line)
        else:
            self._loop.call_soon_threadsafe(self._keep, line)

    def _keep(self, line: dict[str, Any]) -> None:
        self._waiting.append(line)
        if len(self._waiting) >= FLUSH_LINES:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiting:
            return
        lines, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._ship(lines))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _ship(self, lines: list[dict[str, Any]]) -> None:
        item = {
            "type": RUN_LOGS,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "batch": secrets.token_hex(12),
            "lines": lines,
        }
        for attempt in range(TRIES):
            try:
                await self._send(item)
                self.sent += len(lines)
                return
            except Exception as exc:  # never the task's problem
                if attempt == TRIES - 1:
                    self.dropped += len(lines)
                    log.warning(
                        "run %s: %d log line(s) not shipped: %s", self.run_id, len(lines), exc
                    )
                    return
                await asyncio.sleep(0.2 * (attempt + 1))

    async def close(self) -> None:
        """Send what waits and wait (a while) for every batch to be heard."""
        await asyncio.sleep(0)  # lines handed over from a thread come in first
        self._flush()
        if self._sending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_SECONDS):
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
        self.run_log.add(level, message, fields)
        # The run keeps every field; the worker's own log gets those that do
        # not clash with a LogRecord's attributes (``thread``, ``name``, …),
        # which logging refuses with a KeyError that would end the task.
        kwargs["extra"] = {k: v for k, v in extra.items() if k not in _RECORD_ATTRIBUTES}
        super().log(level, msg, *args, **kwargs)
