"""The OpenAPI document covers every public route, and real answers fit it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from starlette.routing import Mount, Route

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import Stack
from tests.helpers import ROOT, need
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


def _task_paths(document: dict[str, Any]) -> set[str]:
    """The per-task trigger operations: one route, documented once per task."""
    generic = "/api/v1/tasks/{task}/trigger"
    return {
        p
        for p in document["paths"]
        if p != generic and re.fullmatch(r"/api/v1/tasks/[^{/]+/trigger", p)
    }


def test_every_public_route_is_in_the_document(document: dict[str, Any]) -> None:
    tasks = _task_paths(document)
    documented = {
        (m.upper(), p) for p, ops in document["paths"].items() for m in ops if p not in tasks
    }
    assert public_routes() == documented
    # Each registered task has its operation, typed by its own schemas.
    names = {p.split("/")[4] for p in tasks}
    assert {
        "echo",
        "crop-image",
        "llm",
        "sleep",
        "execute-workflow",
        "tests.durable-fanout",
    } <= names
    crop = document["paths"]["/api/v1/tasks/crop-image/trigger"]["post"]
    body = crop["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    trigger = document["components"]["schemas"][body.rsplit("/", 1)[1]]
    assert trigger["properties"]["payload"]["$ref"].endswith("/CropPayload")
    assert trigger["required"] == []  # CropPayload has no required field
    answer = crop["responses"]["202"]["content"]["application/json"]["schema"]["$ref"]
    run = document["components"]["schemas"][answer.rsplit("/", 1)[1]]
    assert run["allOf"][1]["properties"]["output"]["anyOf"][0]["$ref"].endswith("/CropOutput")


def test_optional_fields_carry_no_default_and_every_event_is_a_webhook(
    document: dict[str, Any], stack: Stack
) -> None:
    options = document["components"]["schemas"]["TriggerOptions"]
    assert not options.get("required")
    assert all("default" not in field for field in options["properties"].values())
    assert "Default: 86400." in options["properties"]["idempotency_key_ttl"]["description"]
    from webhooks.outbox import EVENT_TYPES, TEST_EVENT

    assert set(document["webhooks"]) == {*EVENT_TYPES, TEST_EVENT}
    with stack.client() as client:
        listed = client.get("/api/v1/event-types")
    assert listed.status_code == 200
    check(document, "GET", "/api/v1/event-types", listed)
    catalogue = {e["name"]: e for e in listed.json()["data"]}
    assert set(catalogue) == set(document["webhooks"])
    assert not catalogue["run.started"]["in_wildcard"] and catalogue["run.failed"]["in_wildcard"]
    schema = catalogue["run.completed"]["schema"]
    body = {"type": "run.completed", "timestamp": "t", "data": {"id": "x"}}
    assert list(Draft202012Validator(schema).iter_errors(body))  # data is no whole run
    assert list(Draft202012Validator(schema).iter_errors({**body, "type": "run.failed"}))


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
    # Every callback that came fits its event's schema in the webhooks section.
    calls = receiver.calls_to("/openapi")
    assert any(c.json()["type"] == "webhook.test" for c in calls)
    for c in calls:
        body = c.json()
        operation = document["webhooks"][body["type"]]["post"]
        schema = {
            **operation["requestBody"]["content"]["application/json"]["schema"],
            "components": document["components"],
        }
        errors = list(Draft202012Validator(schema).iter_errors(body))
        assert not errors, (body["type"], [e.message for e in errors[:3]])
    for path in ("/healthz", "/readyz"):
        check(document, "GET", path, httpx.get(stack.base_url + path))
    check(document, "GET", "/api/v1/runs", httpx.get(stack.base_url + "/api/v1/runs"))


def test_typescript_types_generated_from_the_document_compile_an_app(
    document: dict[str, Any], stack: Stack, tmp_path: Path
) -> None:
    """openapi-typescript with its default flags, then tsc --strict over
    tests/node/typed-app.ts, whose ``@ts-expect-error`` lines must fail."""
    if not stack.database_url.startswith("sqlite"):
        pytest.skip("the document is the same on every database: checked once")
    bin_dir = ROOT / "tests" / "node" / "node_modules" / ".bin"
    missing = None
    if shutil.which("node") is None:
        missing = "no node on PATH"
    elif not (bin_dir / "openapi-typescript").exists() or not (bin_dir / "tsc").exists():
        missing = "tests/node has no node_modules: `make test` runs npm ci there"
    need(missing)
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    generated = subprocess.run(
        [str(bin_dir / "openapi-typescript"), "openapi.json", "-o", "api.d.ts"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    shutil.copy(ROOT / "tests" / "node" / "typed-app.ts", tmp_path / "typed-app.ts")
    compiled = subprocess.run(
        [
            str(bin_dir / "tsc"),
            "--strict",
            "--noEmit",
            "--target", "es2022",
            "--module", "esnext",
            "--moduleResolution", "bundler",
            "typed-app.ts",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
