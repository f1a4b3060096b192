"""Requests that arrive together, served by one unit of work.

While ``lanes`` units are in flight, new items wait; when a unit ends, the
items that came meanwhile go together in the next one (at most ``max_group``).
Under load a group of triggers costs one transaction, a few statements and
one Redis round trip instead of each its own (docs/architecture.md, "Writes
and reports"); alone, an item goes at once, as it would without this.

A group that fails runs again item by item, so a request whose item is at
fault hears its own error and the others go on; a failure that is no item's
(the database unreachable) is every item's at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import sqlalchemy as sa

__all__ = ["Coalescer"]

log = logging.getLogger("gateway.runs")

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class Coalescer(Generic[I, R]):
    """:meth:`submit` an item, get its result from ``serve(items)``, which
    gives one result per item, in order."""

    def __init__(
        self,
        serve: Callable[[list[I]], Awaitable[list[R]]],
        *,
        lanes: int = 2,
        max_group: int = 64,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self._serve = serve
        #: Told each unit's size (a metric).
        self._observe = observe
        self.lanes = lanes
        self.max_group = max_group
        self._waiting: list[tuple[I, asyncio.Future[R]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Units served, and items in them (a group is one unit).
        self.units = 0
        self.items = 0

    async def submit(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._running < self.lanes:
            self._running += 1
            # In a context of its own: not the first caller's, whose current
            # span and log fields would otherwise be every item's.
            task = asyncio.create_task(self._lane(), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _lane(self) -> None:
        try:
            while self._waiting:
                group = self._waiting[: self.max_group]
                del self._waiting[: self.max_group]
                group = [(item, future) for item, future in group if not future.cancelled()]
                if group:
                    await self._run(group)
        finally:
            self._running -= 1

    async def _run(self, group: list[tuple[I, asyncio.Future[R]]]) -> None:
        self.units += 1
        self.items += len(group)
        if self._observe is not None:
            self._observe(len(group))
        try:
            results = await self._serve([item for item, _ in group])
        except Exception as exc:
            if len(group) == 1 or isinstance(exc, sa.exc.OperationalError):
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                return
            log.debug("a group of %d failed (%r): each goes alone", len(group), exc)
            for unit in group:
                await self._run([unit])
            return
        except BaseException:  # cancelled: the callers hear it too
            for _, future in group:
                if not future.done():
                    future.cancel()
            raise
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)
