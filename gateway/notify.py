"""Wake-ups for requests that wait on a run: long-polls, event streams, the dashboard.

The process that applies a transition wakes its own waiters at once and
publishes the run ID on a Redis channel (``run_…!`` when the run reached a
final status), so waiters in other gateway processes wake too, and a long-poll
knows whether the change is the one it waits for without reading the run. A
lost message only delays a waiter: waiters check the database every few
seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.exceptions import RedisError

from jobs.protocol import listen_forever

__all__ = ["RunNotifier", "Watch"]

log = logging.getLogger("gateway.notify")

CHANNEL = "gateway:run-updates"
#: Marks a run ID in a message as having reached a final status.
_FINAL = "!"


@dataclasses.dataclass(eq=False)  # each watch is one waiter: hashed by identity
class Watch:
    """What a waiter of one run holds: an event set on each change, and
    whether a change told of a final status."""

    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    final: bool = False


class RunNotifier:
    def __init__(self, redis: Redis, *, channel: str = CHANNEL) -> None:
        self.redis = redis
        self.channel = channel
        self._waiters: dict[str, set[Watch]] = {}
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

    def _wake(self, run_id: str, final: bool) -> None:
        for watch in self._waiters.get(run_id, ()):
            watch.final = watch.final or final
            watch.changed.set()
        for event in self._any:
            event.set()

    async def publish(self, run_id: str, *, final: bool = False) -> None:
        """Tell every waiter of ``run_id`` (and whether it is now final): here
        at once, in other processes with the next message. The changes of one
        turn of the event loop go out as one message (IDs separated by
        spaces), so a busy gateway sends one PUBLISH where it would send
        hundreds."""
        self._wake(run_id, final)
        self._outbox.append(run_id + _FINAL if final else run_id)
        if self._sender is None or self._sender.done():
            # its own context: not that of the request that first wrote
            self._sender = asyncio.create_task(
                self._send(), name="run-notifier-send", context=contextvars.Context()
            )

    async def _send(self) -> None:
        await asyncio.sleep(0)  # let the rest of this turn's changes join
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                await self.redis.publish(self.channel, " ".join(batch))
            except RedisError as exc:  # waiters elsewhere fall back to polling
                log.warning("could not publish the update of %d runs: %s", len(batch), exc)

    @contextlib.contextmanager
    def watch(self, run_id: str) -> Iterator[Watch]:
        """A :class:`Watch` of ``run_id`` while the block runs."""
        watch = Watch()
        self._waiters.setdefault(run_id, set()).add(watch)
        try:
            yield watch
        finally:
            waiters = self._waiters.get(run_id)
            if waiters is not None:
                waiters.discard(watch)
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
            for token in message.split():
                final = token.endswith(_FINAL)
                self._wake(token.removesuffix(_FINAL), final)

        await listen_forever(self.redis, self.channel, wake, what="run notifications")
