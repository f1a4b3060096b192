"""Waitpoints: made and completed through the API and through their signed URL
(no key), timing out, and a workflow's wait and delay nodes that hold no
worker slot while they wait; on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Stack
from tests.gemini import GeminiStandIn
from tests.helpers import wait_until
from tests.receiver import Receiver
from tests.test_tasks import unique


def _make(stack: Stack, **body: Any) -> dict[str, Any]:
    with stack.client() as client:
        answer = client.post("/api/v1/waitpoints", json=body)
    assert answer.status_code in (200, 201), answer.text
    return dict(answer.json())


def test_a_waitpoint_completes_once_through_the_api(stack: Stack) -> None:
    made = _make(stack, tags=["approval"])
    assert made["status"] == "WAITING" and made["id"].startswith("wp_")
    assert made["url"].startswith(stack.base_url + "/api/v1/waitpoints/" + made["id"])
    with stack.client() as client:
        assert client.get(f"/api/v1/waitpoints/{made['id']}").json()["status"] == "WAITING"
        done = client.post(
            f"/api/v1/waitpoints/{made['id']}/complete", json={"output": {"ok": True}}
        )
        assert done.status_code == 200 and done.json()["status"] == "COMPLETED"
        assert done.json()["output"] == {"ok": True} and done.json()["url"] is None
        twice = client.post(f"/api/v1/waitpoints/{made['id']}/complete", json={"output": 2})
        assert twice.status_code == 409
        assert twice.json()["error"]["code"] == "waitpoint_already_completed"
        assert client.get(f"/api/v1/waitpoints/{made['id']}").json()["output"] == {"ok": True}
        other = stack.new_key("wp-other")
    with stack.client(other) as client:
        assert client.get(f"/api/v1/waitpoints/{made['id']}").status_code == 404
    keyed = _make(stack, idempotency_key=unique("wp"))
    again = _make(stack, idempotency_key=keyed["idempotency_key"])
    assert again["id"] == keyed["id"] and again["is_cached"] and not keyed["is_cached"]


def test_its_url_completes_it_with_any_json_and_no_key(stack: Stack) -> None:
    made = _make(stack)
    forged = made["url"].rsplit("/", 1)[0] + "/not-the-token"
    assert httpx.post(forged, json={"x": 1}).status_code == 401
    elsewhere = _make(stack)
    swapped = elsewhere["url"].replace(elsewhere["id"], made["id"])
    assert httpx.post(swapped, json={"x": 1}).status_code == 404
    assert httpx.post(made["url"], content=b"{not json").status_code == 400
    done = httpx.post(made["url"], json=[{"signed": "by a third party"}])
    assert done.status_code == 200, done.text
    assert done.json()["output"] == [{"signed": "by a third party"}]
    assert httpx.post(made["url"], json={}).status_code == 409


def test_a_waitpoint_past_its_timeout_ends_timed_out(stack: Stack) -> None:
    made = _make(stack, timeout="0.5s")
    with stack.client() as client:
        wait_until(
            lambda: client.get(f"/api/v1/waitpoints/{made['id']}").json()["status"] == "TIMED_OUT",
            what="the timeout",
        )
    assert httpx.post(made["url"], json={}).status_code == 409


def _node_waitpoint(stack: Stack, run_id: str, node: str) -> dict[str, Any]:
    def waiting() -> dict[str, Any] | None:
        with stack.client() as client:
            run = client.get(f"/api/v1/runs/{run_id}").json()
        found = run["nodes"][node].get("waitpoint")
        return {"run": run, **found} if found and run["status"] == "WAITING" else None

    return wait_until(waiting, what=f"node {node} to wait")


def test_a_wait_node_resumes_its_workflow_through_the_url_without_a_slot(
    single_slot_stack: Stack, gemini: GeminiStandIn, receiver: Receiver
) -> None:
    stack = single_slot_stack
    path = f"/{unique('wp-events')}"
    with stack.client() as client:
        endpoint = client.post(
            "/api/v1/webhooks",
            json={"url": receiver.url(path), "events": ["waitpoint.completed"]},
        ).json()
    receiver.verify_with(path, endpoint["secret"])
    marker = unique("approved")
    nodes = [
        {"id": "approve", "type": "wait", "data": {"timeout": "1h", "label": "Approve?"}},
        {"id": "ask", "type": "llm", "data": {"system_prompt": "Be brief."}},
    ]
    edges = [
        {
            "source": "approve",
            "target": "ask",
            "sourceHandle": "answer",
            "targetHandle": "user_message",
        }
    ]
    with stack.client() as client:
        started = client.post(
            "/api/v1/tasks/execute-workflow/trigger",
            json={"payload": {"nodes": nodes, "edges": edges}},
        ).json()
    found = _node_waitpoint(stack, started["id"], "approve")
    assert found["run"]["nodes"]["approve"]["status"] == "WAITING"
    assert found["run"]["waiting_for"] == {
        "kind": "waitpoint",
        "node": "approve",
        "waitpoint": found["id"],
    }
    # The workflow waits in the database: the one worker slot runs other work.
    assert stack.run("echo", {"meanwhile": True})["status"] == "COMPLETED"
    posted = {"answer": f"{marker} yes, ship it", "by": "a person"}
    assert httpx.post(found["url"], json=posted).status_code == 200
    with stack.client() as client:
        final = client.get(f"/api/v1/runs/{started['id']}", params={"wait": 30}).json()
    assert final["status"] == "COMPLETED", final["error"]
    assert final["nodes"]["approve"]["output"] == posted
    assert (
        "waitpoint" not in final["nodes"]["approve"]
        or final["nodes"]["approve"]["waitpoint"] is None
    )
    [prompt] = gemini.requests_with(marker)
    assert prompt.user_text.startswith(posted["answer"])  # the field the edge named
    [call] = receiver.wait_calls(path, 1)
    assert call.verified_by and call.json()["type"] == "waitpoint.completed"
    assert call.json()["data"]["id"] == found["id"] and call.json()["data"]["output"] == posted


def test_a_timed_out_wait_fails_its_node(single_slot_stack: Stack) -> None:
    stack = single_slot_stack
    nodes = [
        {"id": "approve", "type": "wait", "data": {"timeout": "0.5s"}},
        {"id": "after", "type": "llm", "data": {"user_message": "never asked"}},
    ]
    edges = [{"source": "approve", "target": "after", "targetHandle": "system_prompt"}]
    with stack.client() as client:
        started = client.post(
            "/api/v1/tasks/execute-workflow/trigger",
            json={"payload": {"nodes": nodes, "edges": edges}},
        ).json()
        final = client.get(f"/api/v1/runs/{started['id']}", params={"wait": 30}).json()
    assert final["status"] == "FAILED" and final["error"]["code"] == "node_failed"
    assert final["nodes"]["approve"]["status"] == "FAILED"
    assert final["nodes"]["approve"]["error"]["code"] == "waitpoint_timed_out"
    assert final["nodes"]["after"]["status"] == "SKIPPED"


def test_a_delay_node_waits_without_a_slot_and_passes_its_input_on(
    single_slot_stack: Stack, gemini: GeminiStandIn
) -> None:
    stack = single_slot_stack
    marker = unique("delayed")
    nodes = [
        {"id": "text", "type": "text", "data": {"text": f"{marker} after the pause"}},
        {"id": "pause", "type": "delay", "data": {"seconds": 1}},
        {"id": "ask", "type": "llm", "data": {}},
    ]
    edges = [
        {"source": "text", "target": "pause", "targetHandle": "input"},
        {"source": "pause", "target": "ask", "targetHandle": "user_message"},
    ]
    with stack.client() as client:
        started = client.post(
            "/api/v1/tasks/execute-workflow/trigger",
            json={"payload": {"nodes": nodes, "edges": edges}},
        ).json()
    _node_waitpoint(stack, started["id"], "pause")
    assert stack.run("echo", {"meanwhile": True})["status"] == "COMPLETED"
    with stack.client() as client:
        final = client.get(f"/api/v1/runs/{started['id']}", params={"wait": 30}).json()
    assert final["status"] == "COMPLETED", final["error"]
    [prompt] = gemini.requests_with(marker)
    assert prompt.user_text == f"{marker} after the pause"


def test_wait_and_delay_nodes_are_checked(stack: Stack) -> None:
    for node in (
        {"id": "w", "type": "wait", "data": {"timeout": "soon"}},
        {"id": "d", "type": "delay", "data": {}},
        {"id": "d", "type": "delay", "data": {"until": "tomorrow"}},
    ):
        with stack.client() as client:
            answer = client.post(
                "/api/v1/tasks/execute-workflow/trigger", json={"payload": {"nodes": [node]}}
            )
        assert answer.status_code == 422, answer.text
    with stack.client() as client:
        for body in ({"timeout": -1}, {"tags": ["x"] * 11}, {"nope": 1}):
            assert client.post("/api/v1/waitpoints", json=body).status_code == 422
        assert client.post("/api/v1/waitpoints/wp_nope/complete", json={}).status_code == 404


def test_the_client_and_the_cli_cover_waitpoints(stack: Stack) -> None:
    import json

    import pytest

    from gateway.client import Client, ConflictError
    from tests.test_client import cli

    with Client(stack.base_url, stack.api_key) as gw:
        made = gw.create_waitpoint(timeout="1h", tags=["client"])
        assert made["status"] == "WAITING" and made["tags"] == ["client"]
        assert gw.complete_waitpoint(made["id"], {"ok": 1})["output"] == {"ok": 1}
        with pytest.raises(ConflictError):
            gw.complete_waitpoint(made["id"], {"ok": 2})
        assert gw.get_waitpoint(made["id"])["status"] == "COMPLETED"
    key = stack.api_key
    created = json.loads(cli(stack, "waitpoints", "create", "--timeout", "5m", key=key).stdout)
    done = cli(stack, "waitpoints", "complete", created["id"], "--output", '{"by": "cli"}', key=key)
    assert json.loads(done.stdout)["output"] == {"by": "cli"}
    again = cli(stack, "waitpoints", "complete", created["id"], key=key)
    assert again.returncode == 1 and "waitpoint_already_completed" in again.stderr


def test_canceling_a_waiting_workflow_ends_its_waitpoint(stack: Stack) -> None:
    nodes = [{"id": "approve", "type": "wait", "data": {"timeout": "1h"}}]
    with stack.client() as client:
        started = client.post(
            "/api/v1/tasks/execute-workflow/trigger",
            json={"payload": {"nodes": nodes, "edges": []}},
        ).json()
        waiting = _node_waitpoint(stack, started["id"], "approve")
        assert client.post(f"/api/v1/runs/{started['id']}/cancel").status_code == 200
        ended = client.get(f"/api/v1/waitpoints/{waiting['id']}").json()
        run = client.get(f"/api/v1/runs/{started['id']}").json()
    assert ended["status"] == "CANCELED"
    assert run["status"] == "CANCELED" and run["nodes"]["approve"]["status"] == "CANCELED"
    late = httpx.post(waiting["url"], json={"approved": True})
    assert late.status_code == 409, late.text
    assert late.json()["error"]["code"] == "waitpoint_already_completed"
