"""Callback signatures: the Standard Webhooks spec, signed by its own library.

(Worker → gateway requests are signed in ``jobs.protocol``.)
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import time
from collections.abc import Sequence

from standardwebhooks.webhooks import Webhook

__all__ = [
    "SECRET_PREFIX",
    "USER_AGENT",
    "generate_webhook_secret",
    "sign_webhook",
    "webhook_headers",
]

SECRET_PREFIX = "whsec_"
USER_AGENT = "webhook-job-gateway/0.1 (+standard-webhooks)"


def generate_webhook_secret(nbytes: int = 32) -> str:
    """A new ``whsec_`` secret: base64 of ``nbytes`` (24 to 64) random bytes."""
    if not 24 <= nbytes <= 64:
        raise ValueError("a webhook secret has 24 to 64 random bytes")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode()


def sign_webhook(msg_id: str, timestamp: int, body: str, secrets_: Sequence[str]) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` per secret, space-separated.

    Signed by the ``standardwebhooks`` library, so any receiver that uses it
    (or ``svix``) verifies the call unchanged.
    """
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return " ".join(Webhook(secret).sign(msg_id, when, body) for secret in secrets_)


def webhook_headers(
    msg_id: str, body: str, secrets_: Sequence[str], *, timestamp: int | None = None
) -> dict[str, str]:
    """Every header of a callback carrying ``body``."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_webhook(msg_id, timestamp, body, secrets_),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
