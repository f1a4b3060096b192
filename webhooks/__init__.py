"""Signing and verification: worker → gateway events, and (later) callbacks."""

from webhooks.signing import EventSignatureError, sign_event_body, verify_event_body

__all__ = ["EventSignatureError", "sign_event_body", "verify_event_body"]
