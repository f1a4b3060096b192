"""Reports from the worker to the gateway: signed HTTP events, retried until heard.

A report is tried a few times at once (a gateway restart or a blip costs a
second or two). If the gateway is still away, the report becomes an arq job of
its own, ``deliver_report``, retried with growing delays for as long as it
takes; it is signed afresh on every try, so a long outage never makes it stale.
Handing it off frees the worker slot: a worker never idles on a dead gateway.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import Any

import httpx
from arq import ArqRedis, Retry

from webhooks.signing import EVENT_SIGNATURE_HEADER, sign_event_body

__all__ = ["EVENTS_PATH", "ReportRejected", "Reporter", "deliver_report", "make_event"]

log = logging.getLogger("jobs.report")

EVENTS_PATH = "/internal/v1/events"
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


class Reporter:
    """Sends events to ``gateway_url`` with the shared ``secret``."""

    def __init__(self, gateway_url: str, secret: str, *, client: httpx.AsyncClient) -> None:
        self.url = gateway_url.rstrip("/") + EVENTS_PATH
        self.secret = secret
        self.client = client

    async def send_once(self, event: dict[str, Any]) -> dict[str, Any]:
        """One try. Returns the gateway's answer; raises on any failure.

        :raises ReportRejected: the gateway will never accept this report
        :raises httpx.HTTPError: the gateway could not be reached or failed
        """
        body = json.dumps(event, separators=(",", ":")).encode()
        response = await self.client.post(
            self.url,
            content=body,
            headers={
                "content-type": "application/json",
                EVENT_SIGNATURE_HEADER: sign_event_body(body, self.secret),
            },
        )
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise httpx.HTTPStatusError(
                f"gateway answered {response.status_code}",
                request=response.request,
                response=response,
            )
        if response.status_code >= 400:
            raise ReportRejected(response.status_code, response.text)
        answer: dict[str, Any] = response.json()
        return answer

    async def report(self, event: dict[str, Any], redis: ArqRedis) -> dict[str, Any] | None:
        """Send ``event``; return the gateway's answer, or ``None`` when the
        report was refused or handed off to ``deliver_report``."""
        last_error: Exception | None = None
        for delay in _INLINE_DELAYS:
            if delay:
                await asyncio.sleep(delay)
            try:
                return await self.send_once(event)
            except ReportRejected as exc:
                log.error("report %s of %s refused: %s", event["type"], event["run_id"], exc)
                return None
            except httpx.HTTPError as exc:
                last_error = exc
        log.warning(
            "gateway unreachable for %s of %s (%s); retrying in the background",
            event["type"],
            event["run_id"],
            last_error,
        )
        await redis.enqueue_job(
            "deliver_report",
            event,
            _job_id=f"report:{event['run_id']}:{event['attempt']}:{event['type']}",
            _defer_by=dt.timedelta(seconds=1),
        )
        return None


async def deliver_report(ctx: dict[str, Any], event: dict[str, Any]) -> str:
    """arq job: one more try of a report the gateway has not heard yet."""
    reporter: Reporter = ctx["reporter"]
    try:
        await reporter.send_once(event)
    except ReportRejected as exc:
        log.error("report %s of %s refused: %s", event["type"], event["run_id"], exc)
        return "refused"
    except httpx.HTTPError as exc:
        delay = min(_MAX_DEFERRED_DELAY, 0.5 * 2 ** min(ctx["job_try"], 10))
        log.info(
            "gateway still unreachable for %s of %s (%s); next try in %.1f s",
            event["type"],
            event["run_id"],
            exc,
            delay,
        )
        raise Retry(defer=delay) from exc
    return "delivered"
