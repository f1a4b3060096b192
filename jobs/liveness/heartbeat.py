"""Heartbeats of the attempts a worker process runs, from a thread of its own.

The gateway ends an attempt whose heartbeat stops for ``HEARTBEAT_TIMEOUT`` as
``worker_lost`` and runs it again: that is how a killed worker's runs come
back in seconds. A heartbeat must therefore stop when, and only when, the
process is gone. Sent from the worker's event loop it would also stop while a
task holds the loop (an ``async def`` that computes or logs without awaiting),
and a busy but live worker would lose its runs. So one thread beats for every
attempt in hand, in one signed request per ``HEARTBEAT_INTERVAL``, with a
client of its own: it depends on nothing but the process being alive.

The same thread says the worker is there (:class:`jobs.protocol.WorkerPresence`,
what ``GET /api/v1/workers`` lists) on every beat, in attempts or not, and
once more when it stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from jobs.protocol import EVENTS_PATH, SIGNATURE_HEADER, WORKERS_PATH, dumps, sign_request
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

    #: What the worker says of itself, given the runs it holds and its state
    #: (``running`` or ``stopped``): a :class:`jobs.protocol.WorkerPresence`.
    Presence = Callable[[list[str], str], dict[str, Any]]

    def __init__(
        self,
        gateway_url: str,
        secret: str,
        *,
        interval: float,
        worker_id: str,
        presence: Presence | None = None,
    ) -> None:
        self.base = gateway_url.rstrip("/")
        self.secret = secret
        self.interval = interval
        self.worker_id = worker_id
        self.presence = presence
        #: ``time.monotonic()`` of the last request the gateway answered.
        self.answered_at: float | None = None
        self._lock = threading.Lock()
        self._attempts: dict[tuple[str, int, int], None] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeats", daemon=True)

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

    @property
    def in_hand(self) -> int:
        """Attempts held now (the slots in use)."""
        with self._lock:
            return len(self._attempts)

    def _loop(self) -> None:
        timeout = httpx.Timeout(max(1.0, self.interval * 2), connect=2.0)
        with httpx.Client(timeout=timeout) as client:
            stopped = False
            while not stopped:
                with self._lock:
                    attempts = list(self._attempts)
                self._announce(client, attempts, "running")
                for start in range(0, len(attempts), MAX_BEATS):
                    self._beat(client, attempts[start : start + MAX_BEATS])
                stopped = self._stopped.wait(self.interval)
            self._announce(client, [], "stopped")

    def _announce(
        self, client: httpx.Client, attempts: list[tuple[str, int, int]], state: str
    ) -> None:
        if self.presence is not None:
            runs = list(dict.fromkeys(run_id for run_id, _, _ in attempts))
            self._post(client, WORKERS_PATH, dumps(self.presence(runs, state)))

    def _beat(self, client: httpx.Client, attempts: list[tuple[str, int, int]]) -> None:
        events: list[dict[str, Any]] = [
            make_event(
                "heartbeat", run_id=run_id, attempt=attempt, step=step, worker_id=self.worker_id
            )
            for run_id, attempt, step in attempts
        ]
        self._post(client, EVENTS_PATH, dumps({"events": events}))

    def _post(self, client: httpx.Client, path: str, body: bytes) -> None:
        signature = sign_request(self.secret, "POST", path, "", body)
        try:
            response = client.post(
                self.base + path,
                content=body,
                headers={"content-type": "application/json", SIGNATURE_HEADER: signature},
            )
            if response.status_code >= 400:
                log.debug("%s answered %d: %s", path, response.status_code, response.text[:200])
            else:
                self.answered_at = time.monotonic()
        except httpx.HTTPError as exc:  # a missed beat is fine; the next may get through
            log.debug("%s not delivered: %s", path, exc)
