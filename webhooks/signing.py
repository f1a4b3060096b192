"""Signatures: worker → gateway events (itsdangerous) and callbacks (Standard Webhooks).

The body stays plain JSON; the ``gateway-signature`` header carries a
:class:`itsdangerous.TimestampSigner` signature over the body's SHA-256, so
the gateway checks both who sent it and how old it is, and a worker can sign
afresh on every retry of the same report.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
import time
from collections.abc import Sequence

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner
from standardwebhooks.webhooks import Webhook

__all__ = [
    "EVENT_SIGNATURE_HEADER",
    "SECRET_PREFIX",
    "USER_AGENT",
    "EventSignatureError",
    "generate_webhook_secret",
    "sign_event_body",
    "sign_webhook",
    "verify_event_body",
    "webhook_headers",
]

EVENT_SIGNATURE_HEADER = "gateway-signature"
_SALT = "gateway.worker-event.v1"


class EventSignatureError(Exception):
    """A worker event whose signature is missing, wrong or too old.

    :param code: ``invalid_signature`` or ``signature_expired``
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


def _signer(secret: str) -> TimestampSigner:
    return TimestampSigner(secret, salt=_SALT)


def sign_event_body(body: bytes, secret: str) -> str:
    """The value of the signature header for ``body``, valid from now."""
    digest = hashlib.sha256(body).hexdigest()
    return _signer(secret).sign(digest).decode()


def verify_event_body(body: bytes, signature: str | None, secret: str, *, max_age: int) -> None:
    """Raise :class:`EventSignatureError` unless ``signature`` signs ``body``
    with ``secret`` and is at most ``max_age`` seconds old."""
    if not signature:
        raise EventSignatureError("invalid_signature", f"missing {EVENT_SIGNATURE_HEADER} header")
    try:
        digest = _signer(secret).unsign(signature, max_age=max_age)
    except SignatureExpired:
        raise EventSignatureError(
            "signature_expired", f"event signature is older than {max_age} s"
        ) from None
    except BadSignature:
        raise EventSignatureError("invalid_signature", "event signature does not match") from None
    if digest.decode() != hashlib.sha256(body).hexdigest():
        raise EventSignatureError("invalid_signature", "event signature does not match the body")


# -- Standard Webhooks: gateway → receiver callbacks -------------------------

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
