"""Trigger.dev's SDK, unchanged, against the gateway's ``/trigger.dev`` room.

Each test runs ``tests/node/sdk.mjs`` under node with the two variables a
Trigger.dev user sets, ``TRIGGER_API_URL`` and ``TRIGGER_SECRET_KEY``; the SDK
parses every answer with its own zod schemas, so an answer of the wrong shape
fails here. ``make test`` installs the pinned SDK with ``npm ci``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.receiver import Receiver
from tests.test_tasks import data_uri, quadrants

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    missing = None
    if path is None:
        missing = "no node on PATH"
    elif not (NODE_DIR / "node_modules" / "@trigger.dev" / "sdk").is_dir():
        missing = "tests/node has no node_modules: `make test` runs npm ci there"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the SDK tests, and cannot here: {missing}")
        pytest.skip(missing)
    assert path is not None
    return path


def sdk(node: str, stack: Stack, op: str, *, key: str | None = None, **args: Any) -> Any:
    """Run one SDK call; its result, or the SDK's error as ``{"error": …}``."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "TRIGGER_API_URL": stack.base_url + "/trigger.dev",
        "TRIGGER_SECRET_KEY": key or stack.api_key,
    }
    done = subprocess.run(
        [node, "sdk.mjs", json.dumps({"op": op, **args})],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, (done.stdout, done.stderr)
    answer = json.loads(lines[-1])
    return answer.get("result", answer)


def test_a_workflow_triggered_with_the_sdk_is_polled_to_completed(node: str, stack: Stack) -> None:
    graph = {
        "nodes": [
            {"id": "photo", "type": "image", "data": {"url": data_uri(quadrants())}},
            {
                "id": "crop",
                "type": "crop-image",
                "data": {"x_percent": 0, "y_percent": 0, "width_percent": 50, "height_percent": 50},
            },
        ],
        "edges": [{"source": "photo", "target": "crop", "targetHandle": "image"}],
    }
    done = sdk(node, stack, "triggerAndPoll", task="execute-workflow", payload=graph, options={})
    handle, run = done["handle"], done["run"]
    assert handle["id"].startswith("run_") and handle["publicAccessToken"].startswith("pat_")
    assert run["id"] == handle["id"] and run["status"] == "COMPLETED"
    assert run["isCompleted"] and run["isSuccess"] and not run["isFailed"]
    assert run["taskIdentifier"] == "execute-workflow"
    assert run["output"]["nodes"]["crop"]["status"] == "COMPLETED"
    [child] = run["relatedRuns"]["children"]
    assert child["taskIdentifier"] == "crop-image" and child["status"] == "COMPLETED"
    assert run["attemptCount"] >= 1
    # The public token the SDK handed out reads that run, as a browser would.
    with stack.client(handle["publicAccessToken"]) as browser:
        assert browser.get(f"/trigger.dev/api/v3/runs/{run['id']}").json()["id"] == run["id"]
        other = stack.run("echo", {})["id"]
        assert browser.get(f"/trigger.dev/api/v3/runs/{other}").status_code == 404


def test_trigger_options_and_a_superjson_payload_reach_the_run(node: str, stack: Stack) -> None:
    payload = {
        "when": {"$date": "2026-01-02T03:04:05.000Z"},
        "count": {"$bigint": "12345678901234567890"},
        "by_name": {"$map": [["a", 1], ["b", {"$set": [1, 2]}]]},
        "gone": {"$undefined": True},
        "list": [1, {"$undefined": True}],
    }
    options = {
        "tags": ["sdk", "first"],
        "idempotencyKey": "order-7",
        "idempotencyKeyTTL": "1h",
        "queue": "sdk-queue",
        "concurrencyKey": "customer-1",
        "priority": 30,
        "maxAttempts": 2,
        "maxDuration": 60,
        "metadata": {"source": "node"},
        "ttl": "10m",
    }
    first = sdk(node, stack, "trigger", task="echo", payload=payload, options=options)
    again = sdk(node, stack, "trigger", task="echo", payload=payload, options=options)
    assert again["id"] == first["id"] and again["isCached"] is True and not first["isCached"]
    run = sdk(node, stack, "poll", id=first["id"])
    assert run["status"] == "COMPLETED"
    expected = {
        "when": "2026-01-02T03:04:05.000Z",
        "count": 12345678901234567890,
        "by_name": {"a": 1, "b": [1, 2]},
        "list": [1, None],
    }
    # JavaScript's JSON.parse reads the count as a double; the run has it exact.
    output = dict(run["output"])
    assert output.pop("count") == pytest.approx(expected["count"], rel=1e-15)
    assert output == {k: v for k, v in expected.items() if k != "count"}
    assert run["tags"] == ["first", "sdk"] and run["metadata"] == {"source": "node"}
    with stack.client() as client:
        mine = client.get(f"/api/v1/runs/{first['id']}").json()
    assert mine["payload"] == expected and mine["output"] == expected
    assert mine["queue"] == "sdk-queue" and mine["concurrency_key"] == "customer-1"
    assert mine["priority"] == 30


def test_a_failing_run_a_bad_key_and_an_unknown_run_are_the_sdks_errors(
    node: str, stack: Stack
) -> None:
    failed = sdk(
        node, stack, "triggerAndPoll", task="tests.fail", payload={"code": "nope"}, options={}
    )["run"]
    assert failed["status"] == "FAILED" and failed["isFailed"] and failed["isCompleted"]
    assert failed["error"]["name"] == "nope" and "output" not in failed

    bad_key = sdk(node, stack, "retrieve", key="gw_sk_not_a_key", id=failed["id"])["error"]
    assert bad_key["status"] == 401 and bad_key["name"] == "TriggerApiError"
    unknown = sdk(node, stack, "retrieve", id="run_00000000000000000000000000")["error"]
    assert unknown["status"] == 404 and unknown["code"] == "run_not_found"
    bad_body = sdk(node, stack, "trigger", task="echo", payload={}, options={"maxAttempts": 0})
    assert bad_body["error"]["status"] == 422
    no_task = sdk(node, stack, "trigger", task="no-such-task", payload={}, options={})
    assert no_task["error"]["status"] == 404


def test_list_cancel_replay_and_reschedule(node: str, stack: Stack) -> None:
    key = stack.new_key("sdk-list")
    made = [
        sdk(node, stack, "trigger", key=key, task="echo", payload={"n": n}, options={"tags": ["l"]})
        for n in range(3)
    ]
    delayed = sdk(node, stack, "trigger", key=key, task="echo", payload={}, options={"delay": "1h"})
    for handle in made:
        sdk(node, stack, "poll", key=key, id=handle["id"])
    listed = sdk(node, stack, "list", key=key, filters={"status": "COMPLETED", "limit": 2})
    assert [r["id"] for r in listed] == [h["id"] for h in reversed(made)]
    assert all(r["isSuccess"] and r["env"]["id"] for r in listed)
    assert [r["id"] for r in sdk(node, stack, "list", key=key, filters={"status": "DELAYED"})] == [
        delayed["id"]
    ]

    moved = sdk(node, stack, "reschedule", key=key, id=delayed["id"], delay="2h")
    assert moved["status"] == "DELAYED" and moved["isQueued"]
    assert sdk(node, stack, "cancel", key=key, id=delayed["id"]) == {"id": delayed["id"]}
    canceled = sdk(node, stack, "poll", key=key, id=delayed["id"])
    assert canceled["status"] == "CANCELED" and canceled["isCancelled"]
    # Canceling a final run changes nothing and is no error, as on Trigger.dev.
    assert sdk(node, stack, "cancel", key=key, id=delayed["id"]) == {"id": delayed["id"]}

    replayed = sdk(node, stack, "replay", key=key, id=made[0]["id"])
    assert replayed["id"] != made[0]["id"]
    again = sdk(node, stack, "poll", key=key, id=replayed["id"])
    assert again["status"] == "COMPLETED" and again["output"] == {"n": 0}


def test_a_callback_of_a_run_the_sdk_triggered_verifies_in_node(
    node: str, stack: Stack, receiver: Receiver
) -> None:
    key = stack.new_key("sdk-callback")
    path = f"/sdk/{secrets.token_hex(4)}"
    with stack.client(key) as client:
        hook = client.post(
            "/api/v1/webhooks", json={"url": receiver.url(path), "events": ["run.completed"]}
        ).json()
    handle = sdk(node, stack, "trigger", key=key, task="echo", payload={"to": "node"}, options={})
    [call] = receiver.wait_calls(path, 1)

    def verify(secret: str, body: str) -> Any:
        done = subprocess.run(
            [
                node,
                "verify.mjs",
                json.dumps({"secret": secret, "body": body, "headers": call.headers}),
            ],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    verified = verify(hook["secret"], call.body.decode())["verified"]
    assert verified["type"] == "run.completed" and verified["data"]["id"] == handle["id"]
    assert verified["data"]["output"] == {"to": "node"}
    assert "refused" in verify(hook["secret"], call.body.decode().replace("node", "edon"))
