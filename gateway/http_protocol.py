"""uvicorn's HTTP protocol, with the two limits it lacks against slow clients.

uvicorn closes an idle keep-alive connection, but not one that is slow to send
its request: a client that sends a header line every few seconds, or nothing
at all, holds its connection (and a file descriptor) for as long as it likes,
and a few thousand such clients starve everyone else. This protocol:

- gives a new connection ``WEB_HEADER_TIMEOUT`` seconds to complete the
  headers of its first request; past that it answers ``408`` and closes it
  (a keep-alive connection's later requests follow a request that arrived in
  time; uvicorn's keep-alive timeout bounds the wait for them);
- keeps at most ``WEB_MAX_CONNECTIONS`` connections open in the process: a
  connection beyond them is answered ``503`` (JSON, with ``Retry-After``) and
  closed at once, so the clients that hold one keep their latency.

A request body, and a response however long (an event stream), are not timed
here: their own limits apply (``MAX_BODY_BYTES``, the stream's own checks).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import Settings

__all__ = ["GuardedHttpProtocol"]


@functools.cache
def _limits() -> tuple[float, int]:
    """``(WEB_HEADER_TIMEOUT, WEB_MAX_CONNECTIONS)``, read once per process
    (uvicorn builds the protocol itself, in each of its processes)."""
    settings = Settings.from_env()
    return settings.web_header_timeout, settings.web_max_connections


def _answer(status: str, code: str, message: str, extra: str = "") -> bytes:
    body = f'{{"error":{{"code":"{code}","message":"{message}","details":[]}}}}'.encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


_TOO_SLOW = _answer(
    "408 Request Timeout", "request_timeout", "the request headers did not arrive in time"
)
_TOO_MANY = _answer(
    "503 Service Unavailable",
    "too_many_connections",
    "the server has as many connections open as it takes; try again shortly",
    "retry-after: 1\r\n",
)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a connection cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout, self.max_connections = _limits()
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self, looked_again: bool = False) -> None:
        self._header_timer = None
        if not looked_again:
            # The loop may have stalled (a busy host) with the headers already
            # in the socket: timers run before the socket is read (uvloop), so
            # look once more after the loop has read what is there.
            self._header_timer = self.loop.call_later(0.05, self._too_slow, True)
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_TOO_SLOW)
            self.transport.close()
