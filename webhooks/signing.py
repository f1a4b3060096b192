"""Signatures for worker → gateway events (itsdangerous).

The body stays plain JSON; the ``gateway-signature`` header carries a
:class:`itsdangerous.TimestampSigner` signature over the body's SHA-256, so
the gateway checks both who sent it and how old it is, and a worker can sign
afresh on every retry of the same report.
"""

from __future__ import annotations

import hashlib

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner

__all__ = [
    "EVENT_SIGNATURE_HEADER",
    "EventSignatureError",
    "sign_event_body",
    "verify_event_body",
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
