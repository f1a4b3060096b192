"""Canceling runs: a running task is aborted, a workflow takes its children with it."""

from __future__ import annotations

import secrets

import httpx

from tests.conftest import Stack
from tests.helpers import wait_until
from tests.receiver import Receiver
from tests.test_tasks import data_uri, quadrants


def status(client: httpx.Client, run_id: str) -> str:
    return str(client.get(f"/api/v1/runs/{run_id}").json()["status"])


def test_canceling_a_running_sleep_aborts_it_and_frees_the_slot(
    single_slot_stack: Stack, receiver: Receiver
) -> None:
    stack = single_slot_stack
    key = stack.new_key("cancel-sleep")
    path = f"/canceled/{secrets.token_hex(4)}"
    with stack.client(key) as client:
        hook = client.post(
            "/api/v1/webhooks", json={"url": receiver.url(path), "events": ["run.canceled"]}
        ).json()
        receiver.verify_with(path, hook["secret"])
        run_id = client.post(
            "/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 30}}
        ).json()["id"]
        wait_until(lambda: status(client, run_id) == "EXECUTING", what="the sleep to start")

        canceled = client.post(f"/api/v1/runs/{run_id}/cancel")
        assert canceled.status_code == 200, canceled.text
        body = canceled.json()
        assert body["status"] == "CANCELED" and body["is_final"] is True
        assert body["finished_at"] is not None
        assert [a["status"] for a in body["attempts"]] == ["CANCELED"]

        again = client.post(f"/api/v1/runs/{run_id}/cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "run_already_final"

        # The only worker slot was running the sleep: an echo can finish now
        # only if the sleep was aborted, not left to run out its 30 seconds.
        echo = client.post("/api/v1/tasks/echo/trigger", json={"payload": {"after": 1}}).json()
        final = client.get(f"/api/v1/runs/{echo['id']}", params={"wait": 15}).json()
        assert final["status"] == "COMPLETED"
        assert status(client, run_id) == "CANCELED"  # the aborted task reported nothing over it

    [call] = receiver.wait_calls(path, 1)
    assert call.verified_by and call.json()["type"] == "run.canceled"
    assert call.json()["data"]["id"] == run_id
    with stack.client(stack.new_key("cancel-stranger")) as stranger:
        assert stranger.post(f"/api/v1/runs/{run_id}/cancel").status_code == 404


def test_canceling_a_workflow_cancels_its_children(
    single_slot_stack: Stack, receiver: Receiver
) -> None:
    stack = single_slot_stack
    receiver.files["/img/slow.png"] = (quadrants(), "image/png")
    receiver.slow["/img/slow.png"] = 20.0
    nodes = [
        {
            "id": "crop",
            "type": "crop-image",
            "data": {
                "image_url": receiver.url("/img/slow.png"),
                "x": 0,
                "y": 0,
                "width": 5,
                "height": 5,
            },
        },
        {"id": "ask", "type": "llm", "data": {"user_message": "never"}},
        {
            "id": "other",
            "type": "crop-image",
            "data": {"image": data_uri(quadrants()), "x": 0, "y": 0, "width": 5, "height": 5},
        },
    ]
    edges = [{"source": "crop", "target": "ask", "targetHandle": "images"}]
    with stack.client() as client:
        run_id = client.post(
            "/api/v1/tasks/execute-workflow/trigger",
            json={"payload": {"nodes": nodes, "edges": edges}},
        ).json()["id"]

        def crop_running() -> bool:
            node = client.get(f"/api/v1/runs/{run_id}").json()["nodes"]["crop"]
            return node["status"] == "EXECUTING"

        wait_until(crop_running, what="the slow crop to start")
        canceled = client.post(f"/api/v1/runs/{run_id}/cancel").json()
        assert canceled["status"] == "CANCELED"
        crop_run = canceled["nodes"]["crop"]["run_id"]
        assert canceled["nodes"]["crop"]["status"] == "CANCELED"
        assert status(client, crop_run) == "CANCELED"
        assert canceled["nodes"]["ask"]["run_id"] is None
        children = stack.query("SELECT node_id, status FROM runs WHERE parent_id = :id", id=run_id)
        assert all(s in ("CANCELED", "COMPLETED") for _, s in children), children
        assert "ask" not in [n for n, _ in children]

        echo = client.post("/api/v1/tasks/echo/trigger", json={"payload": {}}).json()
        final = client.get(f"/api/v1/runs/{echo['id']}", params={"wait": 15}).json()
        assert final["status"] == "COMPLETED"
        assert status(client, run_id) == "CANCELED"
