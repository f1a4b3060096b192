"""Wake-ups for requests that wait on a run: long-polls, event streams, the dashboard.

The process that applies a transition wakes its own waiters at once and
publishes the run ID on a Redis channel, so waiters in other gateway
processes wake too. A lost message only delays a waiter: waiters re-read the
database at least every ``fallback_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from jobs.protocol import listen_forever

__all__ = ["RunNotifier"]

log = logging.getLogger("gateway.notify")

CHANNEL = "gateway:run-updates"


class RunNotifier:
    def __init__(self, redis: Redis, *, channel: str = CHANNEL) -> None:
        self.redis = redis
        self.channel = channel
        self._waiters: dict[str, set[asyncio.Event]] = {}
        #: Set on every change of any run (the dashboard's live feed).
        self._any: set[asyncio.Event] = set()
        #: Run IDs changed here, not yet published to the other processes.
        self._outbox: list[str] = []
        self._sender: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="run-notifier")

    async def stop(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await self._sender  # the last changes still go out
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _wake(self, run_id: str) -> None:
        for event in self._waiters.get(run_id, ()):
            event.set()
        for event in self._any:
            event.set()

    async def publish(self, run_id: str) -> None:
        """Tell every waiter of ``run_id``: here at once, in other processes
        with the next message. The changes of one turn of the event loop go
        out as one message (IDs separated by spaces), so a busy gateway sends
        one PUBLISH where it would send hundreds."""
        self._wake(run_id)
        self._outbox.append(run_id)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="run-notifier-send")

    async def _send(self) -> None:
        await asyncio.sleep(0)  # let the rest of this turn's changes join
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                await self.redis.publish(self.channel, " ".join(batch))
            except RedisError as exc:  # waiters elsewhere fall back to polling
                log.warning("could not publish the update of %d runs: %s", len(batch), exc)

    @contextlib.contextmanager
    def watch(self, run_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``run_id`` changes, while the block runs."""
        event = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[run_id]

    @contextlib.contextmanager
    def watch_any(self) -> Iterator[asyncio.Event]:
        """An event set whenever any run changes (or a delivery is attempted)."""
        event = asyncio.Event()
        self._any.add(event)
        try:
            yield event
        finally:
            self._any.discard(event)

    async def _listen(self) -> None:
        def wake(message: str) -> None:
            for run_id in message.split():
                self._wake(run_id)

        await listen_forever(self.redis, self.channel, wake, what="run notifications")
