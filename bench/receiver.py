"""A lean callback receiver for the benchmarks: asyncio, keep-alive, 204 at once.

The tests' receiver (a thread per connection, signatures verified) would be
measured instead of the gateway. This one reads each request by
``Content-Length``, records its ``webhook-id``, the run ID and the time it came,
and answers ``204``. A signature is checked on every hundredth call (the
``standardwebhooks`` library), so the figures are of real, verifiable callbacks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

from standardwebhooks.webhooks import Webhook

__all__ = ["FastReceiver"]

_ANSWER = b"HTTP/1.1 204 No Content\r\nconnection: keep-alive\r\n\r\n"


@dataclass
class FastReceiver:
    """Records ``run_id → monotonic time of its first callback``."""

    secret: str | None = None
    arrived: dict[str, float] = field(default_factory=dict)
    webhook_ids: Counter[str] = field(default_factory=Counter)
    bad_signatures: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _waiters: dict[str, asyncio.Future[float]] = field(default_factory=dict)
    _all: asyncio.Event = field(default_factory=asyncio.Event)
    _expect: int = 0

    async def start(self) -> FastReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # End the keep-alive connections' handlers here (left to asyncio.run
            # to cancel, Python 3.11 logs each as an error).
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def expect(self, count: int) -> None:
        """``wait_all`` returns once ``count`` distinct runs have been called back."""
        self._expect = count
        self._all.clear()
        if len(self.arrived) >= count:
            self._all.set()

    async def wait_all(self, within: float) -> None:
        await asyncio.wait_for(self._all.wait(), within)

    async def wait_for(self, run_id: str, within: float = 30.0) -> float:
        if run_id in self.arrived:
            return self.arrived[run_id]
        future = self._waiters.setdefault(run_id, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(future, within)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                now = time.monotonic()
                writer.write(_ANSWER)
                self._record(headers, body, now)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    def _record(self, headers: dict[str, str], body: bytes, now: float) -> None:
        webhook_id = headers.get("webhook-id", "")
        self.webhook_ids[webhook_id] += 1
        if self.secret and sum(self.webhook_ids.values()) % 100 == 1:
            try:
                Webhook(self.secret).verify(body, headers)
            except Exception:
                self.bad_signatures += 1
        run_id = json.loads(body)["data"]["id"]
        if run_id not in self.arrived:
            self.arrived[run_id] = now
            waiter = self._waiters.pop(run_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)
            if self._expect and len(self.arrived) >= self._expect:
                self._all.set()
