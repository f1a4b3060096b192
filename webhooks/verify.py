"""For receivers: check that a callback came from the gateway.

    from webhooks import verify, WebhookVerificationError

    try:
        event = verify(request_body, request_headers, "whsec_...")
    except WebhookVerificationError:
        return 401

It is the ``standardwebhooks`` library's check (signature, and a timestamp at
most five minutes off), so ``svix``'s ``Webhook.verify`` accepts the same calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["WebhookVerificationError", "verify"]


def verify(body: bytes | str, headers: Mapping[str, str], secret: str) -> Any:
    """The parsed event if ``headers`` sign ``body`` with ``secret``.

    :raises WebhookVerificationError: a missing, wrong or stale signature
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    return Webhook(secret).verify(body, lowered)
