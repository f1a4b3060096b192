"""What every route of the Trigger.dev room does first: who calls, and the body."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.api.bodies import json_dict
from gateway.api.routing import invalid_cursor
from gateway.api.views import JSON
from gateway.errors import ValidationFailed
from gateway.services import services_of

__all__ = ["after_cursor", "json_body", "offset_page", "project_of"]


async def project_of(request: Request) -> str:
    services = services_of(request)
    await services.schema.require()
    return (await services.auth.authenticate(request)).project_id


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, within the gateway's body limit."""
    return await json_dict(request, services_of(request).settings.max_body_bytes)


def offset_page(
    request: Request, every: Sequence[Any], render: Callable[[Any], dict[str, Any]]
) -> Response:
    """One page of ``every`` as the SDK's offset pages are:
    ``{data, pagination: {currentPage, totalPages, count}}`` (``page`` from 1,
    ``perPage`` 1 to 100)."""
    raw_page = request.query_params.get("page") or "1"
    raw_size = request.query_params.get("perPage") or "25"
    if not (raw_page.isdigit() and raw_size.isdigit()) or int(raw_page) < 1:
        raise ValidationFailed(
            details=[{"path": "query.page", "type": "value_error", "message": "a page from 1"}]
        )
    page, per_page = int(raw_page), int(raw_size)
    if not 1 <= per_page <= 100:
        raise ValidationFailed(
            details=[{"path": "query.perPage", "type": "value_error", "message": "1 to 100"}]
        )
    shown = every[(page - 1) * per_page : page * per_page]
    return JSON(
        {
            "data": [render(item) for item in shown],
            "pagination": {
                "currentPage": page,
                "totalPages": max(1, math.ceil(len(every) / per_page)),
                "count": len(every),
            },
        }
    )


_ID = re.compile(r"^[a-z]+_[0-9a-hjkmnp-tv-z]{26}$")


def after_cursor(request: Request, prefix: str) -> str | None:
    """``page[after]``: the ID of the last item of the page before (``prefix_…``),
    or a 400 ``invalid_cursor``."""
    raw = request.query_params.get("page[after]") or None
    if raw is not None and not (raw.startswith(prefix + "_") and _ID.match(raw)):
        raise invalid_cursor(raw)
    return raw
