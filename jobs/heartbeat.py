"""Heartbeats of the attempts a worker process runs, from a thread of its own.

The gateway ends an attempt whose heartbeat stops for ``HEARTBEAT_TIMEOUT`` as
``worker_lost`` and runs it again: that is how a killed worker's runs come
back in seconds. A heartbeat must therefore stop when, and only when, the
process is gone. Sent from the worker's event loop it would also stop while a
task holds the loop (an ``async def`` that computes or logs without awaiting),
and a busy but live worker would lose its runs. So one thread beats for every
attempt in hand, in one signed request per ``HEARTBEAT_INTERVAL``, with a
client of its own: it depends on nothing but the process being alive.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx

from jobs.protocol import EVENTS_PATH, SIGNATURE_HEADER, dumps, sign_request
from jobs.report import make_event

__all__ = ["Heartbeats"]

log = logging.getLogger("jobs.heartbeat")

#: Heartbeat events in one request at most.
MAX_BEATS = 500


class Heartbeats:
    """Beats every ``interval`` seconds for the attempts :meth:`add` named
    until :meth:`discard`; :meth:`start` and :meth:`stop` the thread.

    :param gateway_url: where reports go (``GATEWAY_URL``)
    :param secret: the shared secret reports are signed with
    """

    def __init__(self, gateway_url: str, secret: str, *, interval: float, worker_id: str) -> None:
        self.url = gateway_url.rstrip("/") + EVENTS_PATH
        self.secret = secret
        self.interval = interval
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self._attempts: dict[tuple[str, int, int], None] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeats", daemon=True)
        #: Requests sent, for tests and logs.
        self.sent = 0

    def add(self, run_id: str, attempt: int, step: int) -> None:
        with self._lock:
            self._attempts[(run_id, attempt, step)] = None

    def discard(self, run_id: str, attempt: int, step: int) -> None:
        with self._lock:
            self._attempts.pop((run_id, attempt, step), None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        timeout = httpx.Timeout(max(1.0, self.interval * 2), connect=2.0)
        with httpx.Client(timeout=timeout) as client:
            while not self._stopped.wait(self.interval):
                with self._lock:
                    attempts = list(self._attempts)
                for start in range(0, len(attempts), MAX_BEATS):
                    self._beat(client, attempts[start : start + MAX_BEATS])

    def _beat(self, client: httpx.Client, attempts: list[tuple[str, int, int]]) -> None:
        events: list[dict[str, Any]] = [
            make_event(
                "heartbeat", run_id=run_id, attempt=attempt, step=step, worker_id=self.worker_id
            )
            for run_id, attempt, step in attempts
        ]
        body = dumps({"events": events})
        signature = sign_request(self.secret, "POST", EVENTS_PATH, "", body)
        try:
            response = client.post(
                self.url,
                content=body,
                headers={"content-type": "application/json", SIGNATURE_HEADER: signature},
            )
            self.sent += 1
            if response.status_code >= 400:
                log.debug("heartbeats answered %d: %s", response.status_code, response.text[:200])
        except httpx.HTTPError as exc:  # a missed beat is fine; the next may get through
            log.debug("heartbeats not delivered: %s", exc)
