"""The OpenAPI document covers every public route, and real answers fit it."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from starlette.routing import Mount, Route

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import Stack
from tests.receiver import Receiver


@pytest.fixture(scope="module")
def document(stack: Stack) -> dict[str, Any]:
    answer = httpx.get(stack.base_url + "/openapi.json")
    assert answer.status_code == 200
    doc: dict[str, Any] = answer.json()
    assert doc["openapi"] == "3.1.0"
    return doc


def public_routes() -> set[tuple[str, str]]:
    app = create_app(Settings(secret_key="x" * 20, redis_url="redis://127.0.0.1:1"))
    found = set()
    for route in app.routes:
        if isinstance(route, Mount) or not getattr(route, "include_in_schema", True):
            continue  # the dashboard: HTML pages, not the API
        assert isinstance(route, Route)
        if route.path.startswith("/internal/"):
            continue  # worker-only, signed with the shared secret
        path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, path))
    return found


def test_every_public_route_is_in_the_document(document: dict[str, Any]) -> None:
    documented = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert public_routes() == documented


def check(document: dict[str, Any], method: str, path: str, answer: httpx.Response) -> None:
    """``answer`` has a status the document lists for the operation, and its
    body fits that status's schema."""
    operation = document["paths"][path][method.lower()]
    assert str(answer.status_code) in operation["responses"], (method, path, answer.status_code)
    content = operation["responses"][str(answer.status_code)].get("content")
    if content is None:
        return
    schema = {**content["application/json"]["schema"], "components": document["components"]}
    errors = list(Draft202012Validator(schema).iter_errors(answer.json()))
    assert not errors, [e.message for e in errors[:3]]


def test_real_answers_fit_the_document(
    document: dict[str, Any], stack: Stack, receiver: Receiver
) -> None:
    key = stack.new_key("openapi")
    with stack.client(key) as client:

        def call(method: str, template: str, url: str | None = None, **kw: Any) -> httpx.Response:
            answer = client.request(method, url or template, **kw)
            check(document, method, template, answer)
            return answer

        run = call(
            "POST",
            "/api/v1/tasks/{task}/trigger",
            "/api/v1/tasks/echo/trigger",
            json={"payload": {"x": 1}, "options": {"idempotency_key": "oa"}},
        ).json()
        call(
            "POST",
            "/api/v1/tasks/{task}/trigger",
            "/api/v1/tasks/echo/trigger",
            json={"payload": {"x": 1}, "options": {"idempotency_key": "oa"}},
        )
        call("POST", "/api/v1/tasks/{task}/trigger", "/api/v1/tasks/nope/trigger", json={})
        call(
            "POST",
            "/api/v1/tasks/{task}/trigger",
            "/api/v1/tasks/sleep/trigger",
            json={"payload": {"seconds": "x"}},
        )
        call("POST", "/api/v1/tasks/{task}/trigger", "/api/v1/tasks/echo/trigger", content=b"{nope")
        run_path = f"/api/v1/runs/{run['id']}"
        call("GET", "/api/v1/runs/{run_id}", run_path, params={"wait": 30})
        call("GET", "/api/v1/runs/{run_id}", "/api/v1/runs/run_missing")
        call("GET", "/api/v1/runs", params={"limit": 5})
        call("GET", "/api/v1/runs", params={"limit": 0})
        call("GET", "/api/v1/tasks")
        call("POST", "/api/v1/runs/{run_id}/cancel", run_path + "/cancel")
        replay = call("POST", "/api/v1/runs/{run_id}/replay", run_path + "/replay").json()
        delayed = call(
            "POST",
            "/api/v1/tasks/{task}/trigger",
            "/api/v1/tasks/echo/trigger",
            json={"options": {"delay": "1h"}},
        ).json()
        call(
            "POST",
            "/api/v1/runs/{run_id}/reschedule",
            f"/api/v1/runs/{delayed['id']}/reschedule",
            json={"delay": 0},
        )
        call("POST", "/api/v1/runs/{run_id}/cancel", f"/api/v1/runs/{replay['id']}/cancel")
        batch = call(
            "POST",
            "/api/v1/tasks/batch",
            json={"items": [{"task": "echo"}, {"task": "sleep", "payload": {"seconds": 0}}]},
        ).json()
        call("GET", "/api/v1/batches/{batch_id}", f"/api/v1/batches/{batch['batch_id']}")

        endpoint = call(
            "POST", "/api/v1/webhooks", json={"url": receiver.url("/openapi"), "events": ["*"]}
        ).json()
        ep = f"/api/v1/webhooks/{endpoint['id']}"
        call("GET", "/api/v1/webhooks")
        call("GET", "/api/v1/webhooks/{endpoint_id}", ep)
        call("PATCH", "/api/v1/webhooks/{endpoint_id}", ep, json={"description": "d"})
        call("GET", "/api/v1/webhooks/{endpoint_id}/secret", ep + "/secret")
        call("POST", "/api/v1/webhooks/{endpoint_id}/rotate-secret", ep + "/rotate-secret", json={})
        test = call("POST", "/api/v1/webhooks/{endpoint_id}/test", ep + "/test").json()
        receiver.wait_calls("/openapi", 1)
        call("GET", "/api/v1/webhooks/{endpoint_id}/deliveries", ep + "/deliveries")
        call("GET", "/api/v1/runs/{run_id}/deliveries", run_path + "/deliveries")
        call(
            "POST",
            "/api/v1/deliveries/{delivery_id}/resend",
            f"/api/v1/deliveries/{test['id']}/resend",
        )
        call(
            "POST",
            "/api/v1/webhooks/{endpoint_id}/recover",
            ep + "/recover",
            json={"since": "2026-01-01T00:00:00Z"},
        )
        call("GET", "/api/v1/webhooks/signing-secret")
        call("DELETE", "/api/v1/webhooks/{endpoint_id}", ep)
        call("GET", "/api/v1/webhooks/{endpoint_id}", ep)

        crop = stack.run(
            "crop-image",
            {
                "image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEU"
                "gAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAA"
                "MBAQDJ/pLvAAAAAElFTkSuQmCC",
                "x": 0,
                "y": 0,
                "width": 1,
                "height": 1,
            },
            key=key,
        )
        assert crop["status"] == "COMPLETED", crop["error"]
        call(
            "GET",
            "/api/v1/artifacts/{artifact_id}/link",
            f"/api/v1/artifacts/{crop['output']['artifact_id']}/link",
        )
    for path in ("/healthz", "/readyz"):
        check(document, "GET", path, httpx.get(stack.base_url + path))
    check(document, "GET", "/api/v1/runs", httpx.get(stack.base_url + "/api/v1/runs"))
