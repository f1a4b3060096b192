"""Trigger.dev's wire format and the gateway's, each way (docs/trigger-dev.md).

The SDK's answers are parsed by the zod schemas of ``@trigger.dev/core`` v4
(``v3/schemas/api.js``: ``TriggerTaskRequestBody``, ``RetrieveRunResponse``,
``ListRunResponseItem``); this module builds exactly those shapes from the
gateway's run views, and the gateway's trigger request from the SDK's. No rule
of the gateway's is written again here: the translated request goes through
the same checks and services as ``POST /api/v1/tasks/{task}/trigger``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.api.bodies import parse_json
from gateway.errors import ValidationFailed
from gateway.trigger_dev.superjson import SuperjsonRefused, decode

__all__ = [
    "FINAL",
    "list_item",
    "retrieved_run",
    "sdk_status",
    "trigger_request",
]

#: The gateway's statuses as the SDK's ``RunStatus``: a run waiting for its
#: next attempt is queued again (Trigger.dev's v4 API has no RETRYING).
_STATUS = {
    "DELAYED": "DELAYED",
    "QUEUED": "QUEUED",
    "RETRYING": "QUEUED",
    "EXECUTING": "EXECUTING",
    "WAITING": "WAITING",
    "COMPLETED": "COMPLETED",
    "FAILED": "FAILED",
    "CANCELED": "CANCELED",
    "EXPIRED": "EXPIRED",
    "TIMED_OUT": "TIMED_OUT",
}
#: The SDK's statuses that are final: ``runs.poll`` stops at them.
FINAL = ("COMPLETED", "FAILED", "CANCELED", "EXPIRED", "TIMED_OUT")

# The SDK's trigger options the gateway has a meaning for, and their names here.
_RENAMED = {
    "concurrencyKey": "concurrency_key",
    "idempotencyKey": "idempotency_key",
    "idempotencyKeyTTL": "idempotency_key_ttl",
    "maxAttempts": "max_attempts",
    "maxDuration": "max_duration",
    "delay": "delay",
    "ttl": "ttl",
    "tags": "tags",
    "priority": "priority",
}
#: Options that shape how Trigger.dev's platform runs a task (machines,
#: versions, regions, its own bookkeeping): nothing here to apply them to.
_IGNORED = frozenset(
    {
        "payloadType",
        "payloadSize",
        "metadataType",
        "idempotencyKeyOptions",
        "machine",
        "lockToVersion",
        "externalDeploymentId",
        "region",
        "test",
        "parentRunId",
        "resumeParentOnCompletion",
        "parentBatch",
        "parentAttempt",
        "dependentAttempt",
        "dependentBatch",
        "bulkActionId",
        "concurrency",
        "gates",
    }
)


def _packet(value: Any, kind: str | None, field: str) -> Any:
    """A payload or metadata as sent: JSON text or superjson text, decoded."""
    if kind in (None, "application/json") and not isinstance(value, str):
        return value
    if kind == "application/store":
        raise ValidationFailed(
            f"{field} was offloaded to Trigger.dev's object store, which this gateway lacks",
            details=[{"path": field, "type": "unsupported_packet", "message": kind}],
        )
    if not isinstance(value, str):
        return value
    document = parse_json(value.encode())
    if kind == "application/super+json":
        try:
            return decode(document, field=field)
        except SuperjsonRefused as exc:
            raise ValidationFailed(
                str(exc), details=[{"path": exc.path, "type": "superjson", "message": str(exc)}]
            ) from None
    return document


def trigger_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The gateway's trigger request (``{"payload", "options"}``) for the SDK's
    ``TriggerTaskRequestBody``; options with no meaning here are dropped,
    unknown ones refused (422 naming them)."""
    sent = body.get("options") or {}
    if not isinstance(sent, dict):
        raise ValidationFailed(
            details=[{"path": "options", "type": "dict_type", "message": "expected an object"}]
        )
    payload = _packet(body.get("payload"), sent.get("payloadType"), "payload")
    options: dict[str, Any] = {}
    unknown = []
    for name, value in sent.items():
        if value is None or name in _IGNORED:
            continue
        if name in _RENAMED:
            options[_RENAMED[name]] = (
                [value] if name == "tags" and isinstance(value, str) else value
            )
        elif name == "queue":
            options["queue"] = value.get("name") if isinstance(value, dict) else value
        elif name == "metadata":
            options["metadata"] = _packet(value, sent.get("metadataType"), "options.metadata")
        elif name == "debounce" and isinstance(value, dict):
            options["debounce"] = {
                "key": value.get("key"),
                "delay": value.get("delay"),
                **({"mode": value["mode"]} if value.get("mode") else {}),
                **({"max_delay": value["maxDelay"]} if value.get("maxDelay") else {}),
            }
        else:
            unknown.append(name)
    if unknown:
        raise ValidationFailed(
            "options this gateway does not know",
            details=[
                {"path": f"options.{n}", "type": "unknown_option", "message": "not supported"}
                for n in unknown
            ],
        )
    return {"payload": payload, "options": options}


def sdk_status(status: str) -> str:
    return _STATUS[status]


def _flags(status: str) -> dict[str, bool]:
    """The ``is*`` helpers, as Trigger.dev's server derives them from a status."""
    final = status in FINAL
    return {
        "isQueued": status in ("QUEUED", "DELAYED"),
        "isExecuting": status == "EXECUTING",
        "isWaiting": status == "WAITING",
        "isCompleted": final,
        "isSuccess": status == "COMPLETED",
        "isFailed": final and status != "COMPLETED",
        "isCancelled": status == "CANCELED",
    }


def _common(run: Mapping[str, Any]) -> dict[str, Any]:
    """``CommonRunFields`` of a gateway run view."""
    status = sdk_status(run["status"])
    common: dict[str, Any] = {
        "id": run["id"],
        "status": status,
        "taskIdentifier": run["task"],
        "isTest": False,
        "createdAt": run["created_at"],
        "updatedAt": run["updated_at"],
        "tags": sorted(run.get("tags") or []),
        "costInCents": 0,
        "baseCostInCents": 0,
        "durationMs": run.get("duration_ms") or 0,
        "metadata": run.get("metadata") or {},
        **_flags(status),
    }
    for name, source in (("startedAt", "started_at"), ("finishedAt", "finished_at")):
        if run.get(source):
            common[name] = run[source]
    return common


def _related(run: Mapping[str, Any]) -> dict[str, Any]:
    """``RelatedRunDetails``: a run's common fields and where it came from."""
    return {
        **_common(run),
        "depth": 1 if run.get("parent_id") else 0,
        "triggerFunction": "trigger",
    }


def retrieved_run(
    run: Mapping[str, Any],
    *,
    parent: Mapping[str, Any] | None = None,
    children: Sequence[Mapping[str, Any]] | None = None,
    schedule: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``RetrieveRunResponse`` of a gateway run view (with its related runs)."""
    answer: dict[str, Any] = {
        **_related(run),
        "payload": run.get("payload"),
        "attemptCount": run.get("attempt") or 0,
        "relatedRuns": {
            **({"parent": _related(parent), "root": _related(parent)} if parent else {}),
            "children": [_related(c) for c in children or []],
        },
    }
    if run["status"] == "COMPLETED":
        answer["output"] = run.get("output")
    error = run.get("error")
    if error:
        answer["error"] = {"name": error["code"], "message": error["message"] or error["code"]}
    if schedule:
        answer["schedule"] = {
            "id": schedule["id"],
            **({"externalId": schedule["external_id"]} if schedule.get("external_id") else {}),
            **(
                {"deduplicationKey": schedule["deduplication_key"]}
                if schedule.get("deduplication_key")
                else {}
            ),
            "generator": {
                "type": "CRON",
                "expression": schedule["cron"],
                "description": schedule["cron"],
            },
        }
    return answer


def list_item(run: Mapping[str, Any], project_id: str) -> dict[str, Any]:
    """``ListRunResponseItem`` of a gateway run view."""
    return {**_common(run), "env": {"id": project_id, "name": "production"}}
