"""Hostile input to every endpoint that takes JSON: no 5xx, and a refusal writes nothing.

Each value below is put in every field of every endpoint that could take it.
What the JSON parser takes is either refused with 400/422 before anything
is written, or stored and read back unchanged, on SQLite and PostgreSQL.

"Unchanged" for a number means the same JSON number, as a JSON reader (a
double) sees it: PostgreSQL's JSONB keeps numbers as exact decimals and
writes ``1.7976931348623157e308`` back as its 309 digits.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from jobs.protocol import EVENTS_PATH, PREPARE_PATH, sign_request
from tests.conftest import TEST_SECRET, Stack
from tests.helpers import dashboard_session

#: Raw JSON that is not JSON (400), or that a database cannot store (422).
REFUSED = {
    "lone-high-surrogate": b'"\\ud800"',
    "lone-low-surrogate": b'"x\\udc00y"',
    "reversed-pair": b'"\\ude00\\ud83d"',
    "nul": b'"a\\u0000b"',
    "nul-key": b'{"\\u0000": 1}',
    "surrogate-key": b'{"k\\udbff": 1}',
    "nan": b"NaN",
    "infinity": b"Infinity",
    "minus-infinity": b"-Infinity",
    "overflow": b"1e999",
    "minus-overflow": b"-1e999",
    "nested-nan": b'{"a": [1, {"b": NaN}]}',
    "int-too-long": b"1" + b"0" * 5000,
    "too-deep": b"[" * 70 + b"]" * 70,
}
#: Raw JSON that is fine: it must come back as it went in.
ACCEPTED = {
    "escaped-backslash-u0000": b'"\\\\u0000"',
    "surrogate-pair": b'"\\ud83d\\ude00"',
    "control-chars": b'"\\u0001\\u001f\\t\\n"',
    "line-separators": b'"\\u2028\\u2029"',
    "big-int": b"1180591620717411303424",
    "tiny-float": b"1e-300",
    "max-float": b"1.7976931348623157e308",
    "unicode-keys": '{"clé": "välue", "鍵": ["値"]}'.encode(),
    "edge-time-string": b'"0001-01-01T00:00:00+23:59"',
}


def _state(stack: Stack, project_id: str, *, delayed: bool = True) -> list[Any]:
    """What a request of this project could write: its runs, keys and batches,
    its endpoints (with their descriptions and secrets) and its deliveries.
    (Not the runs' own progress, which goes on in the background; and the
    DELAYED run only while nothing rescheduled it to start.)"""
    p = {"p": project_id}
    return [
        stack.query("SELECT COUNT(*) FROM runs WHERE project_id = :p", **p),
        stack.query("SELECT id, run_at FROM runs WHERE project_id = :p AND status = 'DELAYED'", **p)
        if delayed
        else [],
        stack.query("SELECT COUNT(*) FROM idempotency_keys WHERE project_id = :p", **p),
        stack.query("SELECT COUNT(*) FROM batches WHERE project_id = :p", **p),
        stack.query(
            "SELECT id, url, description, enabled FROM webhook_endpoints WHERE project_id = :p"
            " ORDER BY id",
            **p,
        ),
        stack.query(
            "SELECT COUNT(*) FROM endpoint_secrets s JOIN webhook_endpoints e"
            " ON e.id = s.endpoint_id WHERE e.project_id = :p",
            **p,
        ),
        stack.query("SELECT id, status FROM deliveries WHERE project_id = :p ORDER BY id", **p),
    ]


Place = Callable[[bytes], bytes]


@dataclasses.dataclass
class Targets:
    client: httpx.Client
    places: dict[str, tuple[str, str, Place]]
    project_id: str


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.fixture(scope="module")
def targets(stack: Stack) -> Iterator[Targets]:
    """One project's client, and where each endpoint takes a value."""
    project = f"hostile-inputs-{secrets.token_hex(3)}"
    key = stack.new_key(project)
    project_id = stack.query("SELECT id FROM projects WHERE name = :n", n=project)[0][0]
    client = stack.client(key)
    endpoint = client.post(
        "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hostile", "events": ["run.failed"]}
    ).json()
    delayed = client.post(
        "/api/v1/tasks/echo/trigger", json={"payload": 1, "options": {"delay": "1d"}}
    ).json()
    ep, run = endpoint["id"], delayed["id"]
    places: dict[str, tuple[str, str, Place]] = {
        "trigger.payload": ("POST", "/api/v1/tasks/echo/trigger", lambda v: b'{"payload": %s}' % v),
        "trigger.tag": (
            "POST",
            "/api/v1/tasks/echo/trigger",
            lambda v: b'{"options": {"tags": [%s]}}' % v,
        ),
        "trigger.metadata": (
            "POST",
            "/api/v1/tasks/echo/trigger",
            lambda v: b'{"options": {"metadata": {"k": %s}}}' % v,
        ),
        "trigger.idempotency_key": (
            "POST",
            "/api/v1/tasks/echo/trigger",
            lambda v: b'{"options": {"idempotency_key": %s}}' % v,
        ),
        "trigger.delay": (
            "POST",
            "/api/v1/tasks/echo/trigger",
            lambda v: b'{"options": {"delay": %s}}' % v,
        ),
        "batch.payload": (
            "POST",
            "/api/v1/tasks/batch",
            lambda v: b'{"items": [{"task": "echo", "payload": %s}]}' % v,
        ),
        "webhook.description": (
            "POST",
            "/api/v1/webhooks",
            lambda v: (
                b'{"url": "http://127.0.0.1:9/x", "events": ["run.expired"], "description": %s}' % v
            ),
        ),
        "webhook.url": (
            "POST",
            "/api/v1/webhooks",
            lambda v: b'{"url": %s, "events": ["run.expired"]}' % v,
        ),
        "webhook.patch": ("PATCH", f"/api/v1/webhooks/{ep}", lambda v: b'{"description": %s}' % v),
        "webhook.rotate": (
            "POST",
            f"/api/v1/webhooks/{ep}/rotate-secret",
            lambda v: b'{"grace_period": %s}' % v,
        ),
        "webhook.recover": (
            "POST",
            f"/api/v1/webhooks/{ep}/recover",
            lambda v: b'{"since": %s}' % v,
        ),
        "run.reschedule": (
            "POST",
            f"/api/v1/runs/{run}/reschedule",
            lambda v: b'{"delay": %s}' % v,
        ),
        "worker.event": (
            "POST",
            EVENTS_PATH,
            lambda v: (
                b'{"type": "completed", "run_id": "run_none", "attempt": 1, "output": %s}' % v
            ),
        ),
        "worker.prepare": ("POST", PREPARE_PATH, lambda v: b'{"delivery_id": %s}' % v),
    }
    yield Targets(client, places, project_id)
    client.close()


def _send(client: httpx.Client, method: str, path: str, body: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if path.startswith("/internal/"):
        headers["gateway-signature"] = sign_request(TEST_SECRET, method, path, "", body)
    return client.request(method, path, content=body, headers=headers)


PLACES = (
    "trigger.payload",
    "trigger.tag",
    "trigger.metadata",
    "trigger.idempotency_key",
    "trigger.delay",
    "batch.payload",
    "webhook.description",
    "webhook.url",
    "webhook.patch",
    "webhook.rotate",
    "webhook.recover",
    "run.reschedule",
    "worker.event",
    "worker.prepare",
)


@pytest.mark.parametrize("place", PLACES)
def test_refused_values_are_400_or_422_and_write_nothing(
    stack: Stack, targets: Targets, place: str
) -> None:
    method, path, put = targets.places[place]
    before = _state(stack, targets.project_id)
    for name, value in REFUSED.items():
        answer = _send(targets.client, method, path, put(value))
        assert answer.status_code in (400, 422), (place, name, answer.status_code, answer.text)
        error = answer.json()["error"]
        assert error["code"] in ("invalid_json", "unsupported_character", "validation_error")
    assert _state(stack, targets.project_id) == before


@pytest.mark.parametrize("place", PLACES)
def test_accepted_values_never_5xx(stack: Stack, targets: Targets, place: str) -> None:
    method, path, put = targets.places[place]
    for name, value in ACCEPTED.items():
        before = _state(stack, targets.project_id, delayed=False)
        answer = _send(targets.client, method, path, put(value))
        assert answer.status_code < 500, (place, name, answer.status_code, answer.text)
        if answer.status_code >= 400:
            assert _state(stack, targets.project_id, delayed=False) == before, (place, name)


@pytest.mark.parametrize("name", ACCEPTED)
def test_an_accepted_payload_reads_back_unchanged_everywhere(
    stack: Stack, targets: Targets, name: str
) -> None:
    client = targets.client
    value = json.loads(ACCEPTED[name])
    body = b'{"payload": {"v": %s}, "options": {"tags": ["t"], "metadata": {"m": %s}}}' % (
        ACCEPTED[name],
        ACCEPTED[name],
    )
    answer = client.post("/api/v1/tasks/echo/trigger", content=body)
    assert answer.status_code == 202, answer.text
    run_id = answer.json()["id"]
    assert answer.json()["payload"] == {"v": value}
    final = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
    assert final["status"] == "COMPLETED", final
    for read in (final["payload"]["v"], final["output"]["v"], final["metadata"]["m"]):
        assert _as_json_reader(read) == _as_json_reader(value), (name, read)
    page = client.get("/api/v1/runs", params={"limit": 100})
    assert page.status_code == 200
    assert any(r["id"] == run_id for r in page.json()["data"])


def _as_json_reader(value: Any) -> Any:
    """``value`` as a JavaScript reader would hold it: numbers as doubles."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {k: _as_json_reader(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json_reader(v) for v in value]
    return value


QUERIES = {
    "nul-in-path": ("/api/v1/runs/run_%00", 400),
    "nul-in-query": ("/api/v1/runs?tag=a%00b", 400),
    "nul-in-cursor": ("/api/v1/runs?cursor=%00", 400),
    "nul-in-wait": ("/api/v1/runs/run_x?wait=%00", 400),
    "time-underflow": ("/api/v1/runs?created_before=0001-01-01T00:00:00%2B23:59", 422),
    "time-overflow": ("/api/v1/runs?created_after=9999-12-31T23:59:59-23:59", 422),
    "not-utf8-in-query": ("/api/v1/runs?task=%ED%A0%80", 200),
    "not-utf8-in-path": ("/api/v1/runs/run_%ED%A0%80", 404),
    "superscript-limit": ("/api/v1/runs?limit=%C2%B3", 422),
}


@pytest.mark.parametrize("name", QUERIES)
def test_hostile_urls_get_a_clear_answer(targets: Targets, name: str) -> None:
    client = targets.client
    path, status = QUERIES[name]
    answer = client.get(path)
    assert answer.status_code == status, (name, answer.text)
    if status >= 400:
        assert answer.json()["error"]["code"]


def test_smaller_inputs_get_a_clear_error_and_change_nothing(stack: Stack) -> None:
    """A body that is not declared as JSON, a cursor no page gave, ``true`` as
    a queue's limit, a feed position past the largest ID."""
    key = stack.new_key(f"small-inputs-{secrets.token_hex(3)}")
    with stack.client(key) as client:
        before = client.get("/api/v1/runs").json()["data"]
        for media in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
            answer = client.post(
                "/api/v1/tasks/echo/trigger",
                content=b'{"payload": {"n": 1}}',
                headers={"content-type": media},
            )
            assert answer.status_code == 415, (media, answer.text)
            assert answer.json()["error"]["code"] == "unsupported_media_type"
        for media in ("application/json", "application/json; charset=utf-8", None):
            headers = {"content-type": media} if media else {}
            answer = client.post(
                "/api/v1/tasks/echo/trigger", content=b'{"payload": {}}', headers=headers
            )
            assert answer.status_code == 202, (media, answer.text)
        made = [r["id"] for r in client.get("/api/v1/runs").json()["data"]]
        assert len(made) == len(before) + 3
        for path in ("/api/v1/runs", f"/api/v1/runs/{made[0]}/logs"):
            for cursor in ("nope", "run_" + "u" * 26, "1" * 40, "msg_01m8w66cn6ppeb62yw7w433qzp"):
                answer = client.get(path, params={"cursor": cursor})
                assert answer.status_code == 400, (path, cursor, answer.text)
                assert answer.json()["error"]["code"] == "invalid_cursor"
        assert client.get("/api/v1/runs", params={"cursor": made[1]}).status_code == 200
        for limit in (True, "2", 1.5):
            answer = client.post(
                "/api/v1/queues", json={"name": "strict-limit", "concurrency_limit": limit}
            )
            assert answer.status_code == 422, (limit, answer.text)
        assert client.get("/api/v1/queues/strict-limit").status_code == 404
    # A live-feed position past the largest ID (PostgreSQL's INTEGER) is
    # "from the newest", not an error that drops the stream.
    dash = dashboard_session(stack.base_url, key)
    try:
        for position in ("1.2147483648", "2147483648.1", "999999999999999999.0"):
            with dash.stream(
                "GET", "/dashboard/stream", headers={"last-event-id": position}
            ) as feed:
                assert feed.status_code == 200
                lines = feed.iter_lines()
                assert next(lines).startswith("retry:")
                run = client_trigger(stack, key)
                # The stream goes on and names the new run's changes.
                assert next(line for line in lines if run in line).startswith("data:")
    finally:
        dash.close()
    assert "OverflowError" not in stack.gateway.log_path.read_text()


def client_trigger(stack: Stack, key: str) -> str:
    with stack.client(key) as client:
        return str(client.post("/api/v1/tasks/echo/trigger", json={}).json()["id"])
