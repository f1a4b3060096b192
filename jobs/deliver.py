"""The ``deliver_webhook`` arq job: one attempt at one callback.

The gateway queues it (after committing the delivery, or to retry one). The
job gets the signed request from the gateway (or from its own arguments, for a
first attempt queued moments ago), sends it, and reports the attempt back as a
signed event; the gateway records it and queues the next try if one is due.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from arq import Retry

from jobs import tracing
from jobs.protocol import PREPARE_PATH
from jobs.report import GatewayUnreachable, Reporter, ReportRejected, retry_delay
from webhooks.sender import AttemptResult, send_webhook
from webhooks.ssrf import IPNetwork, parse_networks

__all__ = ["deliver_webhook", "send_attempt"]

log = logging.getLogger("jobs.deliver")

#: A first attempt's headers are used only this fresh; after that the job
#: asks for new ones (receivers refuse timestamps more than 5 minutes off).
_PREPARED_MAX_AGE = 60.0


async def send_attempt(
    http: aiohttp.ClientSession,
    delivery_id: str,
    prepared: dict[str, Any],
    allowed: Sequence[IPNetwork],
) -> AttemptResult:
    """Send one prepared attempt (``webhooks.sender``) in its ``callback``
    span, whose ``traceparent`` goes to the receiver too; the job's and
    ``gateway dispatch``'s one way out."""
    with tracing.span(
        f"callback {prepared.get('event_type') or 'event'}",
        parent=prepared.get("traceparent"),
        kind="client",
        attributes={"gateway.delivery_id": delivery_id, "url.full": prepared["url"]},
    ) as span:
        headers = dict(prepared["headers"])
        tracing.inject(headers)  # the receiver may go on with the run's trace
        result = await send_webhook(
            http,
            url=prepared["url"],
            headers=headers,
            body=prepared["body"],
            timeout_seconds=float(prepared["timeout"]),
            allowed=allowed,
        )
        if span is not None and result.status_code is not None:
            span.set_attribute("http.response.status_code", result.status_code)
        if not result.succeeded:
            tracing.error(
                span, result.error_code or f"http_{result.status_code}", result.error or ""
            )
    return result


async def deliver_webhook(
    ctx: dict[str, Any],
    delivery_id: str,
    trigger: str = "schedule",
    prepared: dict[str, Any] | None = None,
    retried: bool = False,
) -> str:
    reporter: Reporter = ctx["reporter"]
    # A job arq runs again (its worker died on it) may have sent its attempt
    # already: the gateway records that one lost before another goes out.
    retried = retried or ctx.get("job_try", 1) > 1
    if (
        prepared is None
        or retried
        or time.time() - float(prepared.get("prepared_at", 0)) > _PREPARED_MAX_AGE
    ):
        try:
            prepared = await reporter.call(
                PREPARE_PATH, {"delivery_id": delivery_id, "trigger": trigger, "retried": retried}
            )
        except ReportRejected as exc:
            log.error("delivery %s cannot be prepared: %s", delivery_id, exc)
            return "refused"
        except GatewayUnreachable as exc:
            raise Retry(defer=retry_delay(ctx["job_try"])) from exc
    if not prepared.get("send"):
        return f"skipped: {prepared.get('reason')}"
    result = await send_attempt(
        ctx["callback_http"],
        delivery_id,
        prepared,
        parse_networks(prepared.get("allowed_networks", ())),
    )
    event = {
        "type": "delivery.attempt",
        "delivery_id": delivery_id,
        "key": secrets.token_hex(16),
        "trigger": trigger,
        **result.to_dict(),
    }
    try:
        await reporter.report(event, ctx["redis"])
    except ReportRejected as exc:
        # Refused for good: retrying the report would change nothing, and
        # the delivery's lease lets the reconciler try the delivery again.
        log.error("attempt of delivery %s refused: %s", delivery_id, exc)
        return "attempt refused"
    return "delivered" if result.succeeded else f"failed: {result.status_code or result.error}"
