"""Logging: readable lines by default, one JSON object per line with LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import sys

from gateway.settings import Settings

__all__ = ["configure_logging"]

_CONTEXT_FIELDS = ("run_id", "task", "attempt", "event", "error_code", "delivery_id")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings) -> None:
    """Set up the root logger once per process, as the settings say."""
    root = logging.getLogger()
    if getattr(root, "_gateway_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # One line per request to the gateway or a receiver is noise at INFO.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    root._gateway_configured = True  # type: ignore[attr-defined]
