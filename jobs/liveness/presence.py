"""What a worker says of itself, and its optional health port.

Every beat of :class:`jobs.liveness.heartbeat.Heartbeats` carries a
:class:`jobs.protocol.WorkerPresence` made here: which worker, on which host,
which tasks, how many slots and how many in use, which runs. The gateway keeps
the last one of each worker in Redis (``GET /api/v1/workers``).

With ``WORKER_HEALTH_PORT`` set, :class:`HealthPort` answers ``GET /healthz``
from a thread of its own for an orchestrator's liveness check: 200 while the
event loop turns, 503 once it has been stuck ``WORKER_HEALTH_STALL`` seconds
(a task that blocks the loop, a wedged process), so the orchestrator restarts
what no longer works and leaves alone what is merely busy. A Redis or gateway
outage does not make it fail: the worker waits those out by itself
(docs/architecture.md, "Liveness and outages"), and the answer says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["HealthPort", "LoopTicker", "presence_of", "worker_version"]

log = logging.getLogger("jobs.presence")


def worker_version() -> str:
    """The installed package's version (``unknown`` when run from a bare tree)."""
    try:
        return version("webhook-job-gateway")
    except PackageNotFoundError:
        return "unknown"


def presence_of(
    worker_id: str, *, queue: str, tasks: Sequence[str], slots: int
) -> Callable[[list[str], str], dict[str, Any]]:
    """The :class:`jobs.liveness.heartbeat.Heartbeats` ``presence`` of this process."""
    started_at = dt.datetime.now(dt.UTC).isoformat()
    fixed = {
        "id": worker_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "version": worker_version(),
        "queue": queue,
        "tasks": list(tasks),
        "slots": slots,
        "started_at": started_at,
    }

    def presence(runs: list[str], state: str) -> dict[str, Any]:
        return {**fixed, "slots_in_use": len(runs), "runs": runs, "state": state}

    return presence


class LoopTicker:
    """Notes each turn of the event loop it runs on (once a second)."""

    def __init__(self) -> None:
        self.ticked_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-ticker")

    async def _tick(self) -> None:
        while True:
            self.ticked_at = time.monotonic()
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stuck_for(self) -> float:
        return max(0.0, time.monotonic() - self.ticked_at)


class HealthPort:
    """``GET /healthz`` on ``host:port``, answered from a thread.

    :param status: what to say besides the loop's state (worker ID, slots,
        whether the gateway answers)
    """

    def __init__(
        self,
        host: str,
        port: int,
        ticker: LoopTicker,
        *,
        stall: float,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/healthz":
                    self._answer(404, {"error": {"code": "not_found", "message": "GET /healthz"}})
                    return
                self._answer(*health.answer())

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.ticker = ticker
        self.stall = stall
        self.status = status
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="health-port", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def answer(self) -> tuple[int, dict[str, Any]]:
        stuck = self.ticker.stuck_for()
        ok = stuck < self.stall
        body = {
            "status": "ok" if ok else "stalled",
            "loop_stuck_seconds": round(stuck, 3),
            **self.status(),
        }
        return (200 if ok else 503), body

    def start(self) -> None:
        self._thread.start()
        log.info("health port listening on %s:%d", *self.server.server_address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
