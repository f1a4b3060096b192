"""Trigger.dev's management API, spoken at ``/trigger.dev`` so that its own
SDK drives the gateway unchanged (docs/trigger-dev.md)."""

from gateway.trigger_dev.api import trigger_dev_routes

__all__ = ["trigger_dev_routes"]
