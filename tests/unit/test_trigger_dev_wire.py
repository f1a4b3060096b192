"""Trigger.dev's wire format, each way (``gateway.trigger_dev``), without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import ValidationFailed
from gateway.trigger_dev.superjson import SuperjsonRefused, decode
from gateway.trigger_dev.wire import retrieved_run, trigger_request


def test_superjson_values_become_the_json_a_python_task_reads() -> None:
    document = {
        "json": {
            "when": "1970-01-01T00:00:00.000Z",
            "big": "12345678901234567890",
            "names": [["a", 1], ["b", 2]],
            "pairs": [[1, "one"]],
            "set": [1, 2],
            "gone": None,
            "list": [1, None, 3],
            "dotted.key": "10",
        },
        "meta": {
            "values": {
                "when": ["Date"],
                "big": ["bigint"],
                "names": ["map"],
                "pairs": ["map"],
                "set": ["set"],
                "gone": ["undefined"],
                "list.1": ["undefined"],
                "dotted\\.key": ["bigint"],
            }
        },
    }
    assert decode(document) == {
        "when": "1970-01-01T00:00:00.000Z",
        "big": 12345678901234567890,
        "names": {"a": 1, "b": 2},
        "pairs": [[1, "one"]],
        "set": [1, 2],
        "list": [1, None, 3],
        "dotted.key": 10,
    }


def test_superjson_of_a_root_value_and_nested_annotations() -> None:
    assert decode({"json": "7", "meta": {"values": ["bigint"]}}) == 7
    assert decode({"json": None, "meta": {"values": ["undefined"]}}) is None
    nested = {
        "json": {"m": [["k", ["2026-01-01T00:00:00.000Z"]]]},
        "meta": {"values": {"m": ["map", {"0.1": ["set", {"0": ["Date"]}]}]}},
    }
    assert decode(nested) == {"m": {"k": ["2026-01-01T00:00:00.000Z"]}}
    assert decode({"json": {"plain": True}}) == {"plain": True}


@pytest.mark.parametrize(
    "document",
    [
        {"json": {"x": "NaN"}, "meta": {"values": {"x": ["number"]}}},
        {"json": {"x": 1}, "meta": {"values": {"y.z": ["Date"]}}},
        {"not": "superjson"},
        [1, 2],
    ],
)
def test_what_superjson_cannot_say_in_json_is_refused(document: Any) -> None:
    with pytest.raises(SuperjsonRefused):
        decode(document)


def test_the_sdks_options_become_the_gateways() -> None:
    body = {
        "payload": json.dumps({"json": {"n": "5"}, "meta": {"values": {"n": ["bigint"]}}}),
        "options": {
            "payloadType": "application/super+json",
            "payloadSize": 40,
            "queue": {"name": "gemini"},
            "concurrencyKey": "c-1",
            "idempotencyKey": "f" * 64,
            "idempotencyKeyTTL": "1h",
            "idempotencyKeyOptions": {"key": "k", "scope": "run"},
            "delay": "10m",
            "ttl": 600,
            "tags": "one",
            "priority": 5,
            "maxAttempts": 2,
            "maxDuration": 30,
            "metadata": {"a": 1},
            "machine": "small-1x",
            "debounce": {"key": "d", "delay": "5s", "mode": "trailing", "maxDelay": "1m"},
        },
    }
    assert trigger_request(body) == {
        "payload": {"n": 5},
        "options": {
            "queue": "gemini",
            "concurrency_key": "c-1",
            "idempotency_key": "f" * 64,
            "idempotency_key_ttl": "1h",
            "delay": "10m",
            "ttl": 600,
            "tags": ["one"],
            "priority": 5,
            "max_attempts": 2,
            "max_duration": 30,
            "metadata": {"a": 1},
            "debounce": {"key": "d", "delay": "5s", "mode": "trailing", "max_delay": "1m"},
        },
    }


def test_options_and_packets_the_gateway_cannot_honour_are_422s() -> None:
    with pytest.raises(ValidationFailed) as unknown:
        trigger_request({"payload": {}, "options": {"brandNew": 1}})
    assert unknown.value.details[0]["path"] == "options.brandNew"
    with pytest.raises(ValidationFailed) as stored:
        trigger_request({"payload": "s3://x", "options": {"payloadType": "application/store"}})
    assert stored.value.details[0]["path"] == "payload"
    with pytest.raises(ValidationFailed) as nan:
        trigger_request(
            {
                "payload": json.dumps(
                    {"json": {"x": "NaN"}, "meta": {"values": {"x": ["number"]}}}
                ),
                "options": {"payloadType": "application/super+json"},
            }
        )
    assert nan.value.details[0]["path"] == "payload.x"


def run(status: str, **values: Any) -> dict[str, Any]:
    return {
        "id": "run_1",
        "task": "echo",
        "status": status,
        "payload": {"p": 1},
        "output": {"o": 1},
        "error": None,
        "attempt": 2,
        "tags": ["b", "a"],
        "metadata": {},
        "created_at": "2026-01-01T00:00:00+00:00",
        "updated_at": "2026-01-01T00:00:01+00:00",
        "started_at": None,
        "finished_at": None,
        "duration_ms": None,
        **values,
    }


def test_a_run_in_the_sdks_terms() -> None:
    retrying = retrieved_run(run("RETRYING"))
    assert retrying["status"] == "QUEUED" and retrying["isQueued"] and not retrying["isCompleted"]
    assert "output" not in retrying and retrying["tags"] == ["a", "b"]
    assert retrying["attemptCount"] == 2 and retrying["relatedRuns"] == {"children": []}
    done = retrieved_run(run("COMPLETED", finished_at="2026-01-01T00:00:02+00:00"))
    assert done["output"] == {"o": 1} and done["isSuccess"] and done["finishedAt"]
    failed = retrieved_run(run("FAILED", error={"code": "nope", "message": "it failed"}))
    assert failed["isFailed"] and failed["error"] == {"name": "nope", "message": "it failed"}
    for final in ("CANCELED", "EXPIRED", "TIMED_OUT"):
        shown = retrieved_run(run(final))
        assert shown["isCompleted"] and shown["isFailed"] and not shown["isSuccess"]
    assert retrieved_run(run("CANCELED"))["isCancelled"]
    child = retrieved_run(run("EXECUTING", parent_id="run_0"), parent=run("WAITING"))
    assert child["depth"] == 1 and child["relatedRuns"]["parent"]["isWaiting"]
