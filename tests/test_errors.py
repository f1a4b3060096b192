"""Every bad input gets its status and a JSON error, and changes nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Stack

TRIGGER = "/api/v1/tasks/echo/trigger"


def run_count(stack: Stack) -> int:
    return int(stack.query("SELECT COUNT(*) FROM runs")[0][0])


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert error["message"]
    assert isinstance(error["details"], list)
    return dict(error)


AUTH_CASES = [
    pytest.param({}, "missing_api_key", id="no-header"),
    pytest.param({"authorization": "Bearer gw_sk_not-a-real-key"}, "invalid_api_key", id="bad-key"),
    pytest.param({"authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key", id="wrong-scheme"),
    pytest.param({"authorization": "Bearer"}, "invalid_api_key", id="empty-key"),
]


@pytest.mark.parametrize(("headers", "code"), AUTH_CASES)
def test_no_or_bad_key_is_401(stack: Stack, headers: dict[str, str], code: str) -> None:
    before = run_count(stack)
    trigger = httpx.post(stack.base_url + TRIGGER, json={"payload": {}}, headers=headers)
    assert_error(trigger, 401, code)
    get = httpx.get(stack.base_url + "/api/v1/runs/run_x", headers=headers)
    assert_error(get, 401, code)
    assert run_count(stack) == before


BODY_CASES = [
    pytest.param(
        "/api/v1/tasks/no-such-task/trigger", b"{}", 404, "task_not_found", set(), id="unknown-task"
    ),
    pytest.param(TRIGGER, b"{not json", 400, "invalid_json", set(), id="not-json"),
    pytest.param(TRIGGER, b"\xff\xfe{}", 400, "invalid_json", set(), id="not-utf8"),
    pytest.param(
        TRIGGER,
        b'{"payload": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        "invalid_json",
        set(),
        id="deeply-nested",
    ),
    pytest.param(
        TRIGGER,
        b'{"payload": ' + b'{"a": ' * 65 + b"1" + b"}" * 65 + b"}",
        400,
        "invalid_json",
        set(),
        id="nested-past-the-limit",
    ),
    pytest.param(TRIGGER, b"[1, 2]", 422, "validation_error", {""}, id="not-an-object"),
    pytest.param(
        TRIGGER,
        b'{"payload": {}, "extra": 1}',
        422,
        "validation_error",
        {"extra"},
        id="unknown-field",
    ),
    pytest.param(
        TRIGGER,
        b'{"options": {"tags": "x"}}',
        422,
        "validation_error",
        {"options.tags"},
        id="tags-not-a-list",
    ),
    pytest.param(
        TRIGGER,
        b'{"options": {"tags": ["ok", ""], "metadata": []}}',
        422,
        "validation_error",
        {"options.tags.1", "options.metadata"},
        id="bad-options",
    ),
    pytest.param(
        TRIGGER,
        b'{"options": {"colour": "red"}}',
        422,
        "validation_error",
        {"options.colour"},
        id="unknown-option",
    ),
    pytest.param(
        "/api/v1/tasks/sleep/trigger",
        b'{"payload": {"seconds": -1, "x": 1}}',
        422,
        "invalid_payload",
        {"payload.seconds", "payload.x"},
        id="payload-schema",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "paths"), BODY_CASES)
def test_bad_trigger_bodies(
    stack: Stack, path: str, body: bytes, status: int, code: str, paths: set[str]
) -> None:
    before = run_count(stack)
    with stack.client() as client:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    error = assert_error(response, status, code)
    assert {d["path"] for d in error["details"]} == paths
    assert run_count(stack) == before


def test_body_over_the_limit_is_413(stack: Stack) -> None:
    before = run_count(stack)
    big = b'{"payload": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    with stack.client() as client:
        declared = client.post(TRIGGER, content=big)
        # Without a Content-Length the gateway counts while it reads.
        chunked = client.post(TRIGGER, content=iter([big[:500_000], big[500_000:]]))
    assert_error(declared, 413, "payload_too_large")
    assert_error(chunked, 413, "payload_too_large")
    assert run_count(stack) == before


@pytest.mark.parametrize("wait", ["61", "-1", "soon"])
def test_bad_wait_is_422(stack: Stack, wait: str) -> None:
    run = stack.run("echo", {})
    with stack.client() as client:
        response = client.get(f"/api/v1/runs/{run['id']}", params={"wait": wait})
    error = assert_error(response, 422, "validation_error")
    assert error["details"][0]["path"] == "query.wait"


def test_unknown_route_and_method_are_json(stack: Stack) -> None:
    with stack.client() as client:
        assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
        assert_error(client.delete("/api/v1/tasks/echo/trigger"), 405, "method_not_allowed")
