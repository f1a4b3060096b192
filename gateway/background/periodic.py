"""A pass that one gateway process at a time runs every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import sqlalchemy as sa
from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = ["Periodic"]

log = logging.getLogger("gateway.periodic")


class Periodic:
    """Runs :meth:`run_once` every ``interval`` seconds, in the one process
    that holds a short Redis lock for that turn (``SET NX PX``)."""

    name = "periodic"

    def __init__(self, redis: Redis, interval: float) -> None:
        self.redis = redis
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> object:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        lock = f"gateway:{self.name}:lock"
        while True:
            await asyncio.sleep(self.interval)
            try:
                if await self.redis.set(
                    lock, os.getpid(), nx=True, px=max(1, int(self.interval * 900))
                ):
                    await self.run_once()
            except asyncio.CancelledError:
                raise
            except (sa.exc.OperationalError, sa.exc.InterfaceError, RedisError, OSError) as exc:
                # An outage, not a bug: one line, no traceback.
                first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                log.warning(
                    "%s pass: a dependency does not answer (%s); trying again", self.name, first
                )
            except Exception:
                log.exception("%s pass failed; the next one will try again", self.name)
