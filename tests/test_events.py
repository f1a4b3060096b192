"""Worker events: signatures are checked and transitions are compare-and-set."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from itsdangerous import TimestampSigner

import jobs.protocol as protocol
from db.ids import new_id
from db.models import Run
from db.types import utcnow
from gateway.cli.embedded_redis import EmbeddedRedis
from jobs.protocol import EVENTS_PATH, SignatureError, sign_request, verify_request
from tests.conftest import TEST_SECRET, Databases, Stack, _redis_db, launch_stack
from tests.helpers import db_call


def insert_queued_run(stack: Stack) -> str:
    """A QUEUED run with no job behind it, so only this test reports on it.

    Its ``updated_at`` lies in the future, so the reconciler (which re-queues
    QUEUED runs whose job is missing) leaves it alone.
    """
    run_id = new_id("run")
    now = utcnow()
    row = {
        "id": run_id,
        "project_id": stack.project_id,
        "task": "echo",
        "status": "QUEUED",
        "attempt": 1,
        "payload": {"x": 1},
        "tags": [],
        "metadata": {},
        "created_at": now,
        "updated_at": now + dt.timedelta(days=1),
    }
    db_call(stack.database_url, lambda conn: conn.execute(Run.__table__.insert(), row), write=True)
    return run_id


def event(run_id: str, kind: str, attempt: int = 1, **fields: Any) -> bytes:
    body = {"type": kind, "run_id": run_id, "attempt": attempt, "worker_id": "test", **fields}
    return json.dumps(body).encode()


def signed(body: bytes, secret: str = TEST_SECRET) -> str:
    return sign_request(secret, "POST", EVENTS_PATH, "", body)


def post(stack: Stack, body: bytes, signature: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers[protocol.SIGNATURE_HEADER] = signature
    return httpx.post(stack.base_url + EVENTS_PATH, content=body, headers=headers)


def status_of(stack: Stack, run_id: str) -> tuple[str, Any]:
    row = stack.query("SELECT status, output FROM runs WHERE id = :id", id=run_id)[0]
    output = json.loads(row[1]) if isinstance(row[1], str) else row[1]
    return row[0], output


def signed_in_the_past(body: bytes, seconds: int) -> str:
    class OldSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - seconds

    signer = OldSigner(TEST_SECRET, salt=protocol._SALT)
    return signer.sign(protocol._digest("POST", EVENTS_PATH, "", body)).decode()


def test_forged_expired_and_tampered_events_change_nothing(stack: Stack) -> None:
    run_id = insert_queued_run(stack)
    body = event(run_id, "completed", output={"forged": True})

    missing = post(stack, body, None)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_signature"

    forged = post(stack, body, signed(body, "not-the-secret-at-all-0123"))
    assert forged.status_code == 401
    assert forged.json()["error"]["code"] == "invalid_signature"

    expired = post(stack, body, signed_in_the_past(body, 3600))
    assert expired.status_code == 401
    assert expired.json()["error"]["code"] == "signature_expired"

    other_body = event(run_id, "completed", output={"honest": True})
    tampered = post(stack, body, signed(other_body))
    assert tampered.status_code == 401

    assert status_of(stack, run_id) == ("QUEUED", None)
    assert (
        stack.query("SELECT COUNT(*) FROM run_transitions WHERE run_id = :id", id=run_id)[0][0] == 0
    )


def test_duplicate_late_and_stale_events_are_acknowledged_no_ops(stack: Stack) -> None:
    run_id = insert_queued_run(stack)

    started = event(run_id, "started")
    first = post(stack, started, signed(started))
    assert first.status_code == 200
    assert first.json() == {"applied": True, "status": "EXECUTING", "proceed": True}

    # The same report again (a worker retrying): no change, still 2xx, and the
    # attempt that is running may go on.
    again = post(stack, started, signed(started))
    assert again.status_code == 200
    assert again.json() == {"applied": False, "status": "EXECUTING", "proceed": True}

    # A report of an attempt that is not the current one changes nothing.
    stale = event(run_id, "completed", attempt=2, output={"stale": True})
    assert post(stack, stale, signed(stale)).json()["applied"] is False
    assert status_of(stack, run_id) == ("EXECUTING", None)

    done = event(run_id, "completed", output={"first": True})
    assert post(stack, done, signed(done)).json() == {
        "applied": True,
        "status": "COMPLETED",
        "proceed": False,
    }

    # Replaying the very same signed request, and a late failure, change nothing.
    replay = post(stack, done, signed(done))
    assert replay.status_code == 200
    assert replay.json()["applied"] is False
    late = event(run_id, "failed", error={"code": "late", "message": "too late"})
    assert post(stack, late, signed(late)).json()["applied"] is False
    late_start = post(stack, started, signed(started))
    assert late_start.json() == {"applied": False, "status": "COMPLETED", "proceed": False}

    assert status_of(stack, run_id) == ("COMPLETED", {"first": True})
    rows = stack.query(
        "SELECT to_status FROM run_transitions WHERE run_id = :id ORDER BY id", id=run_id
    )
    assert [r[0] for r in rows] == ["EXECUTING", "COMPLETED"]


def test_completed_report_before_started_still_ends_the_run(stack: Stack) -> None:
    run_id = insert_queued_run(stack)
    done = event(run_id, "completed", output=[1, 2])
    assert post(stack, done, signed(done)).json()["applied"] is True
    started = event(run_id, "started")
    answer = post(stack, started, signed(started)).json()
    assert answer == {"applied": False, "status": "COMPLETED", "proceed": False}
    with stack.client() as client:
        run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "COMPLETED"
    assert run["output"] == [1, 2]
    assert run["started_at"] is not None
    assert [a["status"] for a in run["attempts"]] == ["COMPLETED"]


def test_bad_event_bodies(stack: Stack) -> None:
    unknown = event("run_nope", "started")
    answer = post(stack, unknown, signed(unknown))
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "run_not_found"

    wrong = json.dumps({"type": "exploded", "run_id": "run_x", "attempt": 0}).encode()
    answer = post(stack, wrong, signed(wrong))
    assert answer.status_code == 422
    paths = {d["path"] for d in answer.json()["error"]["details"]}
    assert paths == {"type", "attempt"}


def test_signature_helpers_round_trip() -> None:
    body = b'{"a": 1}'
    signature = signed(body)
    verify_request(TEST_SECRET, signature, "POST", EVENTS_PATH, "", body, max_age=60)
    with pytest.raises(SignatureError) as info:
        verify_request(TEST_SECRET, signature, "POST", EVENTS_PATH, "", body + b" ", max_age=60)
    assert info.value.code == "invalid_signature"
    with pytest.raises(SignatureError) as info:
        verify_request(
            TEST_SECRET, signed_in_the_past(body, 120), "POST", EVENTS_PATH, "", body, max_age=60
        )
    assert info.value.code == "signature_expired"


# -- requests bound to what they ask for ------------------------------------------


def test_a_signed_request_replayed_elsewhere_is_401_and_changes_nothing(stack: Stack) -> None:
    run_id = insert_queued_run(stack)
    body = event(run_id, "completed", output="<script>alert(1)</script>")
    signature = signed(body)  # a real report, signed for POST /internal/v1/events
    headers = {"content-type": "text/html", protocol.SIGNATURE_HEADER: signature}
    artifacts_before = stack.query("SELECT COUNT(*) FROM artifacts")
    elsewhere = [
        ("POST", protocol.ARTIFACTS_PATH + f"?run_id={run_id}&content_type=text%2Fhtml"),
        ("POST", protocol.ARTIFACTS_PATH),
        ("POST", protocol.ARTIFACT_FETCH_PATH + f"?run_id={run_id}"),
        ("POST", protocol.PREPARE_PATH),
        ("POST", EVENTS_PATH + "?extra=1"),
        ("PUT", EVENTS_PATH),
    ]
    for method, path in elsewhere:
        answer = httpx.request(method, stack.base_url + path, content=body, headers=headers)
        assert answer.status_code in (401, 405), (method, path, answer.text)
        if answer.status_code == 401:
            assert answer.json()["error"]["code"] == "invalid_signature"
    assert stack.query("SELECT COUNT(*) FROM artifacts") == artifacts_before
    assert status_of(stack, run_id) == ("QUEUED", None)
    # Where it was signed for, the same request still works.
    assert post(stack, body, signature).json()["applied"] is True


def _upload(stack: Stack, run_id: str, data: bytes, content_type: str) -> httpx.Response:
    query = f"content_type={content_type.replace('/', '%2F')}&run_id={run_id}"
    signature = sign_request(TEST_SECRET, "POST", protocol.ARTIFACTS_PATH, query, data)
    return httpx.post(
        f"{stack.base_url}{protocol.ARTIFACTS_PATH}?{query}",
        content=data,
        headers={protocol.SIGNATURE_HEADER: signature},
    )


def test_an_artifact_is_an_image_and_is_served_as_nothing_else(stack: Stack) -> None:
    run_id = insert_queued_run(stack)
    page = b"<html><script>document.cookie</script></html>"
    for data, content_type in (
        (page, "text/html"),
        (page, "image/png"),  # a page that says it is an image
        (b"<svg onload='alert(1)'/>", "image/svg+xml"),
    ):
        answer = _upload(stack, run_id, data, content_type)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "unsupported_artifact_type"
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    stored = _upload(stack, run_id, png, "image/png")
    assert stored.status_code == 201, stored.text
    served = httpx.get(stored.json()["url"])
    assert served.status_code == 200 and served.content == png
    assert served.headers["content-type"] == "image/png"
    assert served.headers["x-content-type-options"] == "nosniff"
    assert served.headers["content-security-policy"].startswith("sandbox")


def test_events_are_checked_for_meaning(stack: Stack) -> None:
    run_id = insert_queued_run(stack)  # an echo run, not a workflow
    started = event(run_id, "started")
    assert post(stack, started, signed(started)).json()["applied"] is True
    # A durable task's wait that names nothing to wait on, a child of no
    # known task, a child whose payload does not fit its task, a child with
    # options a durable child may not have: each refused, nothing changed.
    for waiting, code in [
        (event(run_id, "waiting"), "invalid_event"),
        (
            event(run_id, "waiting", spawn=[{"node_id": "n", "task": "nope", "options": {}}]),
            "validation_error",
        ),
        (
            event(
                run_id,
                "waiting",
                spawn=[
                    {"node_id": "n", "task": "sleep", "payload": {"seconds": -1}, "options": {}}
                ],
            ),
            "validation_error",
        ),
        (
            event(
                run_id,
                "waiting",
                spawn=[
                    {"node_id": "n", "task": "echo", "options": {"callback_url": "http://x.test"}}
                ],
            ),
            "validation_error",
        ),
    ]:
        answer = post(stack, waiting, signed(waiting))
        assert answer.status_code == 422 and answer.json()["error"]["code"] == code, answer.text
    huge = event(run_id, "completed", output="x" * 70_000)  # MAX_OUTPUT_BYTES is 65536 here
    answer = post(stack, huge, signed(huge))
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "output_too_large"
    assert status_of(stack, run_id) == ("EXECUTING", None)
    assert stack.query("SELECT COUNT(*) FROM runs WHERE parent_id = :id", id=run_id) == [(0,)]


@pytest.fixture(scope="module")
def strict_stack(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A gateway stricter than its worker: it takes outputs of 4 KiB at most
    (the worker thinks 64 KiB), and /metrics wants a token."""
    with launch_stack(
        "strict",
        databases.new("strict"),
        f"{redis_server.url}/{_redis_db(database_url, 5)}",
        tmp_path_factory.mktemp("logs-strict"),
        worker_env={"MAX_OUTPUT_BYTES": "65536"},
        MAX_OUTPUT_BYTES="4096",
        METRICS_TOKEN="scrape-me",
    ) as stack:
        yield stack


def test_a_final_report_refused_for_good_still_ends_the_run(strict_stack: Stack) -> None:
    run = strict_stack.run("tests.big-output", {"bytes": 20_000})
    assert run["status"] == "FAILED", run
    assert run["error"]["code"] == "output_too_large"
    assert "refused" in run["error"]["message"]
    assert strict_stack.worker.alive
    assert strict_stack.run("echo", {"after": True})["status"] == "COMPLETED"


def test_metrics_token_guards_metrics(strict_stack: Stack) -> None:
    url = strict_stack.base_url + "/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    answer = httpx.get(url, headers={"authorization": "Bearer scrape-me"})
    assert answer.status_code == 200 and "gateway_runs_total" in answer.text
