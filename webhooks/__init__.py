"""Callbacks: Standard Webhooks signing and verification, the SSRF guard, the sender."""

from webhooks.signing import generate_webhook_secret, sign_webhook
from webhooks.verify import WebhookVerificationError, verify

__all__ = [
    "WebhookVerificationError",
    "generate_webhook_secret",
    "sign_webhook",
    "verify",
]
