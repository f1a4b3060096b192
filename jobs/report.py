"""Reports from the worker to the gateway: signed HTTP events, batched, retried until heard.

Events go out in batches: one signed request carries the events of every run
that reported in the same turn of the event loop, or while the previous request
was on its way (at most ``MAX_IN_FLIGHT`` requests out at once). An event with
nothing ahead of it leaves at the end of its turn, so batching costs a lone run
no time, and a busy worker sends one request where it would send dozens.

A report is tried a few times at once (a gateway restart or a blip costs a
second or two). If the gateway is still away, the report becomes an arq job of
its own, ``deliver_report``, retried with growing delays for as long as it
takes; it is signed afresh on every try, so a long outage never makes it stale.
Handing it off frees the worker slot: a worker never idles on a dead gateway.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import json
import logging
import urllib.parse
from typing import Any

import aiohttp
import orjson
import yarl
from arq import ArqRedis, Retry

from jobs.contract import DeliverReport
from jobs.protocol import (
    EVENTS_PATH,
    SIGNATURE_HEADER,
    JSONRefused,
    clean_text,
    dumps,
    sign_request,
)

__all__ = [
    "GatewayAnswer",
    "GatewayUnreachable",
    "ReportRejected",
    "Reporter",
    "deliver_report",
    "event_key",
    "gateway_session",
    "make_event",
    "refused_fallback",
    "retry_delay",
]

log = logging.getLogger("jobs.report")

#: Delays before the inline tries; what is still unheard after them is handed off.
_INLINE_DELAYS = (0.0, 0.05, 0.25, 1.0)
_MAX_DEFERRED_DELAY = 30.0


class ReportRejected(Exception):
    """The gateway refused a report for good (a 4xx other than 408/429).

    :param status_code: the gateway's answer
    """

    def __init__(self, status_code: int, body: str) -> None:
        self.status_code = status_code
        super().__init__(f"gateway refused the report with {status_code}: {body[:500]}")


def make_event(
    event_type: str, *, run_id: str, attempt: int, worker_id: str, **fields: Any
) -> dict[str, Any]:
    return {
        "type": event_type,
        "run_id": run_id,
        "attempt": attempt,
        "worker_id": worker_id,
        "occurred_at": dt.datetime.now(dt.UTC).isoformat(),
        **fields,
    }


@dataclasses.dataclass
class _Pending:
    """An event as sent, the future of its answer, and whether it must go alone
    (its batch was too large for the gateway)."""

    encoded: bytes
    answer: asyncio.Future[dict[str, Any]]
    alone: bool = False


#: Requests of batched events out at once; what comes meanwhile waits for the next.
MAX_IN_FLIGHT = 1
#: A batch is cut at about this many bytes (an event larger still goes alone).
MAX_BATCH_BYTES = 512 * 1024


class GatewayUnreachable(Exception):
    """The gateway could not be reached, or answered 5xx, 408 or 429: worth
    another try later."""


@dataclasses.dataclass(frozen=True)
class GatewayAnswer:
    """The gateway's answer to a signed POST."""

    status_code: int
    content: bytes
    headers: dict[str, str]

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


def gateway_session(connections: int = 100) -> aiohttp.ClientSession:
    """The pool a worker's calls to the gateway go through (reports, artifacts,
    waitpoints). aiohttp rather than httpx, as for callbacks: on this path
    httpx cost about seven times the CPU per request and ten times the wait
    (docs/performance.md). A call waits at most 2 s to connect and 10 s for
    each read."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=10.0),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class Reporter:
    """Sends events to ``gateway_url`` with the shared ``secret``, in batches,
    through ``session`` (:func:`gateway_session`)."""

    def __init__(self, gateway_url: str, secret: str, *, session: aiohttp.ClientSession) -> None:
        self.base_url = gateway_url.rstrip("/")
        self.secret = secret
        self.session = session
        self._queue: collections.deque[_Pending] = collections.deque()
        self._in_flight = 0
        #: A flush is due at the end of this turn of the loop.
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def send_once(self, event: dict[str, Any]) -> dict[str, Any]:
        """One try of a report. Returns the gateway's answer; raises on any failure.

        The event joins the next batch (at once if no request is out).

        :raises ReportRejected: the gateway will never accept this report
        :raises JSONRefused: the event is not JSON the gateway takes
        :raises GatewayUnreachable: the gateway could not be reached or failed
        """
        loop = asyncio.get_running_loop()
        pending = _Pending(dumps(event), loop.create_future())
        if not self._flushing:
            # After the callbacks ready now: the reports of the other runs that
            # this turn of the loop woke (jobs claimed together, read in one
            # round trip) join the same request, instead of waiting behind a
            # request that carries the first one alone.
            self._flushing = True
            loop.call_soon(self._flush)
        self._queue.append(pending)
        return await pending.answer

    def _flush(self) -> None:
        self._flushing = False
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            batch = [self._queue.popleft()]
            size = len(batch[0].encoded)
            while (
                not batch[0].alone
                and self._queue
                and not self._queue[0].alone
                and size + len(self._queue[0].encoded) < MAX_BATCH_BYTES
            ):
                batch.append(self._queue.popleft())
                size += len(batch[-1].encoded)
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            body = b'{"events":[' + b",".join(p.encoded for p in batch) + b"]}"
            try:
                response = await self.post(EVENTS_PATH, body, "application/json")
            except ReportRejected as exc:
                if exc.status_code != 413 or len(batch) == 1:
                    raise
                # Too large together (the gateway's limit may be below ours):
                # each goes alone, and each learns its own answer.
                for pending in reversed(batch):
                    pending.alone = True
                    self._queue.appendleft(pending)
                return
            answers = response.json()["answers"]
            for pending, answer in zip(batch, answers, strict=True):
                if pending.answer.done():
                    continue
                if "error" in answer:
                    error = ReportRejected(answer["status_code"], json.dumps(answer["error"]))
                    pending.answer.set_exception(error)
                else:
                    pending.answer.set_result(answer)
        except Exception as exc:  # the request failed as a whole: every event learns why
            for pending in batch:
                if not pending.answer.done():
                    pending.answer.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._flush()

    async def call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One signed POST of ``payload`` to the gateway's ``path``; its JSON answer.

        :raises JSONRefused: ``payload`` is not JSON the gateway would take
        """
        answer: dict[str, Any] = (await self.post(path, dumps(payload), "application/json")).json()
        return answer

    async def post(
        self, path: str, body: bytes, content_type: str, params: dict[str, str] | None = None
    ) -> GatewayAnswer:
        """One signed POST of raw ``body``; the answer if it is a success.

        The signature covers the method, ``path``, the query string and the
        body, so the request means nothing anywhere else.

        :raises ReportRejected: a 4xx the gateway will answer again (not 408/429)
        :raises GatewayUnreachable: the gateway could not be reached, or answered 5xx
        """
        query = urllib.parse.urlencode(sorted((params or {}).items()))
        # Sent as signed: yarl would otherwise requote the query (``%2F`` → ``/``).
        url = yarl.URL(self.base_url + path + (f"?{query}" if query else ""), encoded=True)
        headers = {
            "content-type": content_type,
            SIGNATURE_HEADER: sign_request(self.secret, "POST", path, query, body),
        }
        try:
            async with self.session.post(url, data=body, headers=headers) as response:
                answer = GatewayAnswer(
                    response.status,
                    await response.read(),
                    {k.lower(): v for k, v in response.headers.items()},
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayUnreachable(f"POST {path}: {exc!r}") from exc
        if answer.status_code >= 500 or answer.status_code in (408, 429):
            raise GatewayUnreachable(f"POST {path}: the gateway answered {answer.status_code}")
        if answer.status_code >= 400:
            raise ReportRejected(answer.status_code, answer.text)
        return answer

    async def report(self, event: dict[str, Any], redis: ArqRedis) -> dict[str, Any] | None:
        """Send ``event``; return the gateway's answer, or ``None`` when the
        gateway is away and the report was handed off to ``deliver_report``.

        :raises ReportRejected: the gateway refused the report for good (or it
            is not JSON the gateway takes); retrying would change nothing
        """
        last_error: Exception | None = None
        for delay in _INLINE_DELAYS:
            if delay:
                await asyncio.sleep(delay)
            try:
                return await self.send_once(event)
            except JSONRefused as exc:
                raise ReportRejected(
                    422, f"the report is not JSON the gateway takes: {exc}"
                ) from None
            except GatewayUnreachable as exc:
                last_error = exc
        log.warning(
            "gateway unreachable for report %s (%s); retrying in the background",
            event_key(event),
            last_error,
        )
        job = DeliverReport(event)
        await redis.enqueue_job(
            job.name,
            **job.kwargs(),
            _job_id=f"report:{event_key(event)}",
            _defer_by=dt.timedelta(seconds=1),
        )
        return None


#: Events that end an attempt (or a workflow step): one of them must get through.
_CLOSING = ("completed", "failed", "waiting")


def refused_fallback(event: dict[str, Any], exc: ReportRejected) -> dict[str, Any] | None:
    """The ``failed`` event to send when the gateway refused ``event`` for good,
    so the run still ends (with ``error.code`` saying why) instead of waiting
    for its heartbeat to run out; ``None`` if there is nothing to fall back to."""
    if event.get("type") not in _CLOSING:
        return None
    code = "output_too_large" if exc.status_code == 413 else "report_rejected"
    return make_event(
        "failed",
        run_id=event["run_id"],
        attempt=event["attempt"],
        worker_id=event.get("worker_id") or "",
        step=event.get("step", 0),
        error={
            "code": code,
            "message": clean_text(f"the gateway refused the {event['type']} report: {exc}", 2000),
            "retryable": False,
        },
    )


def event_key(event: dict[str, Any]) -> str:
    """A name for a report, unique per thing reported (the job ID of its retries)."""
    if event["type"] == "delivery.attempt":
        return f"{event['delivery_id']}:{event['key']}"
    return f"{event['run_id']}:{event['attempt']}:{event.get('step', 0)}:{event['type']}"


def retry_delay(job_try: int) -> float:
    """Seconds before the next try of a call to an unreachable gateway."""
    return float(min(_MAX_DEFERRED_DELAY, 0.5 * 2 ** min(job_try, 10)))


async def deliver_report(ctx: dict[str, Any], event: dict[str, Any]) -> str:
    """arq job: one more try of a report the gateway has not heard yet."""
    reporter: Reporter = ctx["reporter"]
    try:
        await reporter.send_once(event)
    except (ReportRejected, JSONRefused) as exc:
        log.error("report %s refused: %s", event_key(event), exc)
        rejected = exc if isinstance(exc, ReportRejected) else ReportRejected(422, str(exc))
        fallback = refused_fallback(event, rejected)
        if fallback is not None:
            await reporter.report(fallback, ctx["redis"])
        return "refused"
    except GatewayUnreachable as exc:
        delay = retry_delay(ctx["job_try"])
        log.info(
            "gateway still unreachable for report %s (%s); next try in %.1f s",
            event_key(event),
            exc,
            delay,
        )
        raise Retry(defer=delay) from exc
    return "delivered"
