"""OpenTelemetry traces, received by a real OTLP/HTTP receiver (tests/otlp.py):
one connected trace per run across the gateway, the worker and the callback
dispatcher, from the caller's ``traceparent`` to the callback's; a child run in a trace of its own,
linked to its parent's; the run and its log lines carry the trace ID. With no
``OTEL_*`` endpoint, runs carry none."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, _redis_db, launch_stack
from tests.otlp import OtlpReceiver, Span
from tests.receiver import Receiver

SERVER, CONSUMER, CLIENT = 2, 5, 3  # the protobuf's SpanKind numbers


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def traced(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    otlp: OtlpReceiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    with launch_stack(
        "traces",
        databases.new("traces"),
        f"{redis_server.url}/{_redis_db(database_url, 19)}",
        tmp_path_factory.mktemp("logs-traces"),
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
    ) as stack:
        yield stack


def _one(spans: list[Span], trace_id: str, name: str) -> Span:
    found = [s for s in spans if s.trace_id == trace_id and s.name == name]
    assert len(found) == 1, (name, found)
    return found[0]


def test_a_run_is_one_trace_across_gateway_worker_and_callback(
    traced: Stack, otlp: OtlpReceiver, receiver: Receiver
) -> None:
    stack = traced
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    path = f"/traced-{secrets.token_hex(4)}"
    with stack.client() as client:
        accepted = client.post(
            "/api/v1/tasks/tests.traced/trigger",
            json={"options": {"callback_url": receiver.url(path)}},
            headers={"traceparent": f"00-{trace_id}-{caller}-01"},
        )
        assert accepted.status_code == 202, accepted.text
        run_id = accepted.json()["id"]
        run = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
        logs = client.get(f"/api/v1/runs/{run_id}/logs").json()["data"]
    assert run["status"] == "COMPLETED" and run["output"] == {"answer": 42}
    assert run["trace_id"] == trace_id
    assert [line["fields"].get("trace_id") for line in logs if line["message"] == "preparing"] == [
        trace_id
    ]
    [call] = receiver.wait_calls(path, 1)
    header = call.headers["traceparent"].split("-")
    assert header[1] == trace_id

    names = (
        "trigger tests.traced",
        "run tests.traced",
        "step prepare",
        "report started",
        "report completed",
        "callback run.completed",
    )
    spans = otlp.wait_for(
        lambda spans: all(
            any(s.trace_id == trace_id and s.name == name for s in spans) for name in names
        )
    )
    trigger, attempt, step, started, completed, callback = (
        _one(spans, trace_id, name) for name in names
    )
    assert (trigger.service, trigger.kind, trigger.parent_id) == ("gateway-web", SERVER, caller)
    assert trigger.attributes["gateway.run_id"] == run_id
    assert (attempt.service, attempt.kind, attempt.parent_id) == (
        "gateway-worker",
        CONSUMER,
        trigger.span_id,
    )
    assert attempt.attributes["gateway.attempt"] == 1
    assert step.parent_id == attempt.span_id and step.service == "gateway-worker"
    for report in (started, completed):
        assert (report.service, report.parent_id) == ("gateway-web", attempt.span_id)
    # The callback left from the dispatcher (``WEBHOOK_DISPATCHER``'s default).
    assert (callback.service, callback.kind, callback.parent_id) == (
        "gateway-dispatch",
        CLIENT,
        trigger.span_id,
    )
    assert callback.attributes["http.response.status_code"] == 200
    assert header[2] == callback.span_id  # the receiver can go on from the callback


def test_a_failed_attempt_marks_its_span_and_a_child_run_is_linked(
    traced: Stack, otlp: OtlpReceiver
) -> None:
    stack = traced
    failed = stack.run("tests.fail", {"code": "nope"}, max_attempts=1)
    assert failed["status"] == "FAILED" and failed["trace_id"]
    spans = otlp.wait_for(
        lambda spans: any(
            s.trace_id == failed["trace_id"] and s.name == "run tests.fail" for s in spans
        )
    )
    attempt = _one(spans, failed["trace_id"], "run tests.fail")
    assert attempt.status_code == 2 and attempt.attributes["error.code"] == "nope"

    parent = stack.run(
        "tests.durable-fanout",
        {"items": [{"task": "echo", "payload": 1}], "then": {"task": "echo", "payload": 2}},
    )
    assert parent["status"] == "COMPLETED", parent["error"]
    child_id = parent["output"]["batch"][0]["id"]
    with stack.client() as client:
        child = client.get(f"/api/v1/runs/{child_id}").json()
    assert child["trace_id"] and child["trace_id"] != parent["trace_id"]
    # Every span asserted below, waited for: each process exports its own in
    # batches, so the worker's can arrive before the web's that it hangs under.
    spans = otlp.wait_for(
        lambda spans: (
            {"run echo", "new run echo"}
            <= {s.name for s in spans if s.trace_id == child["trace_id"]}
            and any(
                s.trace_id == parent["trace_id"] and s.name.startswith("trigger") for s in spans
            )
        )
    )
    root = _one(spans, child["trace_id"], "new run echo")
    assert (root.service, root.parent_id) == ("gateway-web", "")
    parent_root = _one(spans, parent["trace_id"], "trigger tests.durable-fanout")
    assert root.links == [(parent["trace_id"], parent_root.span_id)]
    worker_attempt = _one(spans, child["trace_id"], "run echo")
    assert (worker_attempt.service, worker_attempt.parent_id) == ("gateway-worker", root.span_id)


def test_without_an_endpoint_runs_carry_no_trace(stack: Stack) -> None:
    run: dict[str, Any] = stack.run("echo", {"untraced": True})
    assert run["status"] == "COMPLETED" and run["trace_id"] is None


def test_a_trigger_through_trigger_dev_s_api_takes_the_callers_trace(traced: Stack) -> None:
    stack = traced
    trace_id = secrets.token_hex(16)
    with stack.client() as client:
        accepted = client.post(
            "/trigger.dev/api/v1/tasks/echo/trigger",
            json={"payload": {"from": "sdk"}},
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
        assert accepted.status_code == 200, accepted.text
        run = client.get(f"/api/v1/runs/{accepted.json()['id']}", params={"wait": 30}).json()
    assert run["status"] == "COMPLETED" and run["trace_id"] == trace_id
