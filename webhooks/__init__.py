"""Signing and verification: worker → gateway events, and callbacks to receivers."""

from webhooks.signing import (
    EventSignatureError,
    generate_webhook_secret,
    sign_event_body,
    sign_webhook,
    verify_event_body,
)
from webhooks.verify import WebhookVerificationError, verify

__all__ = [
    "EventSignatureError",
    "WebhookVerificationError",
    "generate_webhook_secret",
    "sign_event_body",
    "sign_webhook",
    "verify",
    "verify_event_body",
]
