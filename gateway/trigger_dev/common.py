"""What every route of the Trigger.dev room does first: who calls, and the body."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from gateway.api.bodies import parse_json, read_body, require_json
from gateway.errors import ValidationFailed
from gateway.services import services_of

__all__ = ["json_body", "project_of"]


async def project_of(request: Request) -> str:
    services = services_of(request)
    await services.schema.require()
    return (await services.auth.authenticate(request)).project_id


async def json_body(request: Request) -> dict[str, Any]:
    services = services_of(request)
    raw = await read_body(request, services.settings.max_body_bytes)
    if not raw.strip():
        return {}
    require_json(request)
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ValidationFailed(
            "the request body must be a JSON object",
            details=[{"path": "", "message": "expected an object", "type": "dict_type"}],
        )
    return data
