"""Webhook endpoints: how the API shows one, and finding one of a project's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from db.models import (
    WebhookEndpoint,
)
from db.rows import owned_row
from db.types import isoformat
from gateway.errors import NotFound

__all__ = ["endpoint_view", "load_endpoint"]

endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]


def endpoint_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "url": row["url"],
        "description": row["description"],
        "events": list(row["events"]),
        "tasks": list(row["tasks"]),
        "enabled": bool(row["enabled"]),
        "disabled_reason": row["disabled_reason"],
        "disabled_at": isoformat(row["disabled_at"]),
        "failing_since": isoformat(row["failing_since"]),
        "last_success_at": isoformat(row["last_success_at"]),
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
    }


def load_endpoint(conn: sa.Connection, project_id: str, endpoint_id: str) -> dict[str, Any]:
    return owned_row(
        conn,
        endpoints,
        endpoint_id,
        project_id,
        NotFound(f"no webhook endpoint with id {endpoint_id!r}", code="endpoint_not_found"),
        where=(endpoints.c.deleted_at.is_(None),),
    )
