"""``tasks.batchTrigger`` and ``batch.trigger``: Trigger.dev's two-phase batch.

Phase one (``POST /api/v3/batches``) reserves a batch ID for ``runCount``
items; phase two (``POST /api/v3/batches/{id}/items``, NDJSON) brings the
items, and the gateway makes all their runs in that batch in one unit of work,
as ``POST /api/v1/tasks/batch`` does. What is kept between the two phases is
in Redis for an hour; the batch itself, once made, is in the database, so a
retried phase two finds it and makes nothing twice (each item also carries an
idempotency key the SDK derives from the batch's and the item's index).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from db.ids import new_id
from gateway.api.bodies import parse_json, read_body, validate
from gateway.api.tasks import check_task_payload
from gateway.api.views import JSON
from gateway.errors import APIError, NotFound, ValidationFailed
from gateway.runs.requests import TriggerRequest
from gateway.services import services_of
from gateway.trigger_dev import wire
from gateway.trigger_dev.common import json_body, project_of

__all__ = ["routes"]

#: How long a reserved batch waits for its items.
RESERVED_SECONDS = 3600
#: How long a batch's idempotency key gives back the same batch.
KEY_SECONDS = 24 * 3600
MAX_ITEMS = 500


def _reserved_key(batch_id: str) -> str:
    return f"trigger.dev:batch:{batch_id}"


async def create_batch(request: Request) -> Response:
    """Phase one: ``{id, runCount, isCached}``."""
    project_id = await project_of(request)
    services = services_of(request)
    body = await json_body(request)
    count = body.get("runCount")
    if not isinstance(count, int) or not 1 <= count <= MAX_ITEMS:
        raise ValidationFailed(
            f"runCount must be a whole number from 1 to {MAX_ITEMS}",
            details=[{"path": "runCount", "type": "value_error", "message": repr(count)}],
        )
    batch_id = new_id("batch")
    key = body.get("idempotencyKey")
    cached = False
    if isinstance(key, str) and key:
        slot = f"trigger.dev:batch-key:{project_id}:{key}"
        if not await services.redis.set(slot, batch_id, nx=True, ex=KEY_SECONDS):
            found = await services.redis.get(slot)
            batch_id, cached = (found.decode() if isinstance(found, bytes) else str(found)), True
    if not cached:
        reserved = orjson.dumps({"project_id": project_id, "count": count})
        await services.redis.set(_reserved_key(batch_id), reserved, ex=RESERVED_SECONDS)
    return JSON(
        {"id": batch_id, "runCount": count, "isCached": cached},
        headers={"x-trigger-jwt": services.tokens.issue(batch_id)},
    )


async def stream_items(request: Request) -> Response:
    """Phase two: the items as NDJSON; ``{id, itemsAccepted, itemsDeduplicated, sealed}``."""
    project_id = await project_of(request)
    services = services_of(request)
    batch_id = request.path_params["batch_id"]
    try:
        made = await services.runs.batch(project_id, batch_id)
    except NotFound:
        made = None
    if made is not None:  # a retried phase two: the runs are there
        total = int(made["count"])
        return JSON(
            {"id": batch_id, "itemsAccepted": 0, "itemsDeduplicated": total, "sealed": True}
        )
    reserved = await services.redis.get(_reserved_key(batch_id))
    if reserved is None or orjson.loads(reserved)["project_id"] != project_id:
        raise NotFound(f"no batch with id {batch_id!r} waits for items", code="batch_not_found")
    expected = int(orjson.loads(reserved)["count"])
    raw = await read_body(request, services.settings.max_body_bytes)
    items: list[tuple[int, str, Any]] = []
    details: list[dict[str, Any]] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        item = parse_json(line)
        if not isinstance(item, dict) or not isinstance(item.get("task"), str):
            raise ValidationFailed(
                "each line is an item: {index, task, payload, options}",
                details=[
                    {"path": f"items.{len(items)}", "type": "dict_type", "message": "no task"}
                ],
            )
        index = item.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            index = len(items) + len(details)
        try:
            request_body = validate(
                TriggerRequest, wire.trigger_request(item), prefix=("items", str(index))
            )
            check_task_payload(services, item["task"], request_body.payload)
        except APIError as exc:
            for detail in exc.details or [{"message": exc.message}]:
                path = str(detail.get("path", ""))
                prefix = f"items.{index}"
                if not path.startswith(prefix):
                    path = f"{prefix}.{path}" if path else prefix
                details.append({**detail, "path": path})
            continue
        items.append((int(index), item["task"], request_body))
    if details:
        raise ValidationFailed(
            "some items do not fit their task", code="invalid_payload", details=details
        )
    if len(items) != expected:
        return JSON(
            {
                "id": batch_id,
                "itemsAccepted": 0,
                "itemsDeduplicated": 0,
                "sealed": False,
                "enqueuedCount": 0,
                "expectedCount": expected,
            }
        )
    items.sort(key=lambda entry: entry[0])
    new = [
        services.runs.new_row(
            project_id, task, body.payload, body.options, field=f"items.{i}.options"
        )
        for i, task, body in items
    ]
    created = await services.runs.create(new, batch_id=batch_id)
    await services.redis.delete(_reserved_key(batch_id))
    deduplicated = sum(1 for _, cached in created if cached)
    return JSON(
        {
            "id": batch_id,
            "itemsAccepted": len(created) - deduplicated,
            "itemsDeduplicated": deduplicated,
            "sealed": True,
        }
    )


routes = [
    Route("/api/v3/batches", create_batch, methods=["POST"]),
    Route("/api/v3/batches/{batch_id}/items", stream_items, methods=["POST"]),
]
