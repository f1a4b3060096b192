"""Trigger.dev's SDK, unchanged, against the gateway's ``/trigger.dev`` room.

Each test runs ``tests/node/sdk.mjs`` under node with the two variables a
Trigger.dev user sets, ``TRIGGER_API_URL`` and ``TRIGGER_SECRET_KEY``; the SDK
parses every answer with its own zod schemas, so an answer of the wrong shape
fails here. ``make test`` installs the pinned SDK with ``npm ci``.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Stack
from tests.helpers import wait_until
from tests.receiver import Receiver
from tests.test_tasks import data_uri, quadrants

NODE_DIR = Path(__file__).parent / "node"


class NodeSDK:
    """One node process running ``tests/node/sdk.mjs``: each call is a JSON
    line in and a JSON line out, so the SDK is loaded once per module."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: What node says on stderr, shown when a call gets no answer.
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [path, "sdk.mjs"],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
            env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def call(self, request: dict[str, Any]) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        try:
            line = self.lines.get(timeout=60)
        except queue.Empty:
            self.errors.seek(0)
            raise AssertionError(
                f"the SDK gave no answer to {request['op']} in 60 s: {self.errors.read()[-2000:]}"
            ) from None
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.errors.close()


@pytest.fixture(scope="module")
def node() -> Iterator[NodeSDK]:
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
    sdk_process = NodeSDK(path)
    yield sdk_process
    sdk_process.close()


def sdk(node: NodeSDK, stack: Stack, op: str, *, key: str | None = None, **args: Any) -> Any:
    """One SDK call against ``stack``'s ``/trigger.dev`` with ``key`` (the
    stack's own by default): its result, or the SDK's error as ``{"error": …}``."""
    answer = node.call(
        {
            "op": op,
            "apiUrl": stack.base_url + "/trigger.dev",
            "secretKey": key or stack.api_key,
            **args,
        }
    )
    return answer.get("result", answer)


def sdk_from_env(node: NodeSDK, stack: Stack, op: str, **args: Any) -> Any:
    """One SDK call in a node process of its own, set up only by the two
    variables a Trigger.dev user sets: ``TRIGGER_API_URL``, ``TRIGGER_SECRET_KEY``."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "TRIGGER_API_URL": stack.base_url + "/trigger.dev",
        "TRIGGER_SECRET_KEY": stack.api_key,
    }
    done = subprocess.run(
        [node.path, "sdk.mjs", json.dumps({"op": op, **args})],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    return answer.get("result", answer)


def test_a_workflow_triggered_with_the_sdk_is_polled_to_completed(
    node: NodeSDK, stack: Stack
) -> None:
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
    done = sdk_from_env(
        node, stack, "triggerAndPoll", task="execute-workflow", payload=graph, options={}
    )
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


def test_trigger_options_and_a_superjson_payload_reach_the_run(node: NodeSDK, stack: Stack) -> None:
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
    node: NodeSDK, stack: Stack
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


def test_list_cancel_replay_and_reschedule(node: NodeSDK, stack: Stack) -> None:
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
    tagged = sdk(node, stack, "list", key=key, filters={"tag": ["l", "nope"], "period": "1h"})
    assert sorted(r["id"] for r in tagged) == sorted(h["id"] for h in made)
    assert sdk(node, stack, "list", key=key, filters={"taskIdentifier": "sleep"}) == []

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
    node: NodeSDK, stack: Stack, receiver: Receiver
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
                node.path,
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


def test_batch_trigger_makes_every_run_once_in_one_batch(node: NodeSDK, stack: Stack) -> None:
    key = stack.new_key("sdk-batch")
    items = [{"payload": {"n": n, "at": {"$date": "2026-01-01T00:00:00.000Z"}}} for n in range(3)]
    handle = sdk(
        node,
        stack,
        "batchTrigger",
        key=key,
        task="echo",
        items=items,
        options={"idempotencyKey": "b1"},
    )
    assert handle["batchId"].startswith("batch_") and handle["runCount"] == 3
    with stack.client(key) as client:
        summary = client.get(f"/api/v1/batches/{handle['batchId']}").json()
        assert summary["count"] == 3 and len(summary["run_ids"]) == 3
        outputs = sorted(
            client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()["output"]["n"]
            for run_id in summary["run_ids"]
        )
    assert outputs == [0, 1, 2]
    in_batch = sdk(node, stack, "list", key=key, filters={"batch": handle["batchId"]})
    assert sorted(r["id"] for r in in_batch) == sorted(summary["run_ids"])
    # The same idempotency key gives back the same batch, and no new runs.
    again = sdk(
        node,
        stack,
        "batchTrigger",
        key=key,
        task="echo",
        items=items,
        options={"idempotencyKey": "b1"},
    )
    assert again["batchId"] == handle["batchId"]
    with stack.client(key) as client:
        assert len(client.get("/api/v1/runs", params={"limit": 100}).json()["data"]) == 3

    mixed = sdk(
        node,
        stack,
        "batchTriggerMixed",
        key=key,
        items=[{"id": "echo", "payload": {"a": 1}}, {"id": "sleep", "payload": {"seconds": 0}}],
    )
    assert mixed["runCount"] == 2
    refused = sdk(
        node,
        stack,
        "batchTriggerMixed",
        key=key,
        items=[{"id": "echo", "payload": {}}, {"id": "sleep", "payload": {"seconds": "x"}}],
    )
    assert refused["error"]["status"] == 422


def test_wait_tokens_are_waitpoints_and_their_url_completes_them(
    node: NodeSDK, stack: Stack
) -> None:
    key = stack.new_key("sdk-tokens")
    token = sdk(node, stack, "createToken", key=key, options={"timeout": "1h", "tags": ["t"]})
    assert token["id"].startswith("wp_") and token["isCached"] is False
    waiting = sdk(node, stack, "retrieveToken", key=key, id=token["id"])
    assert waiting["status"] == "WAITING" and waiting["tags"] == ["t"] and waiting["timeoutAt"]
    assert sdk(node, stack, "completeToken", key=key, id=token["id"], data={"ok": 1}) == {
        "success": True
    }
    done = sdk(node, stack, "retrieveToken", key=key, id=token["id"])
    assert done["status"] == "COMPLETED" and done["output"] == {"ok": 1}

    # The URL completes a token with no key, as a third party would.
    other = sdk(node, stack, "createToken", key=key, options={})
    answer = httpx.post(other["url"], json={"approved": True}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert sdk(node, stack, "retrieveToken", key=key, id=other["id"])["output"] == {
        "approved": True
    }
    timed = sdk(node, stack, "createToken", key=key, options={"timeout": "1s"})
    listed = sdk(node, stack, "listTokens", key=key, filters={"status": "COMPLETED"})
    assert sorted(t["id"] for t in listed) == sorted([token["id"], other["id"]])
    with stack.client(key) as client:
        wait_until(
            lambda: client.get(f"/api/v1/waitpoints/{timed['id']}").json()["status"] == "TIMED_OUT",
            what="the token to time out",
        )
    ended = sdk(node, stack, "retrieveToken", key=key, id=timed["id"])
    assert ended["status"] == "TIMED_OUT" and ended["error"]["name"] == "WaitpointTimeoutError"
    assert [
        t["id"] for t in sdk(node, stack, "listTokens", key=key, filters={"status": "TIMED_OUT"})
    ] == [timed["id"]]


def test_queues_list_pause_resume_override_and_reset(node: NodeSDK, stack: Stack) -> None:
    key = stack.new_key("sdk-queues")
    queue = {"type": "task", "name": "tests.limited"}
    results = sdk(
        node,
        stack,
        "queues",
        key=key,
        actions=[
            ["list"],
            ["retrieve", queue],
            ["pause", queue],
            ["resume", queue],
            ["overrideConcurrencyLimit", queue, 7],
            ["resetConcurrencyLimit", queue],
            ["retrieve", "tests-limited"],
        ],
    )
    listed, retrieved, paused, resumed, overridden, reset, by_id = results
    # The task's queue, found by the task's name (type "task") or by its own.
    names = {q["name"]: q for q in listed["data"]}
    assert names["tests-limited"]["type"] == "task"
    assert names["tests-limited"]["concurrencyLimit"] == 1
    assert retrieved["id"] == "tests-limited" and retrieved["paused"] is False
    assert paused["paused"] is True and resumed["paused"] is False
    assert overridden["concurrencyLimit"] == 7
    assert reset["concurrencyLimit"] == 1 and by_id["concurrencyLimit"] == 1
    unknown = sdk(node, stack, "queues", key=key, actions=[["retrieve", "no-such-queue"]])
    assert unknown["error"]["status"] == 404


def test_a_subscription_yields_each_status_and_ends_at_the_final_one(
    node: NodeSDK, stack: Stack
) -> None:
    handle = sdk(node, stack, "trigger", task="sleep", payload={"seconds": 1.5}, options={})
    seen = sdk(node, stack, "subscribe", id=handle["id"])
    statuses = [s["status"] for s in seen]
    assert statuses[-1] == "COMPLETED" and seen[-1]["isCompleted"] and seen[-1]["finishedAt"]
    assert "EXECUTING" in statuses and statuses.count("COMPLETED") == 1, (seen, handle)
    assert seen[-1]["output"] == {"slept": 1.5}
    # The run's public token opens its subscription, and no other run's.
    with_token = sdk(node, stack, "subscribe", key=handle["publicAccessToken"], id=handle["id"])
    assert [s["status"] for s in with_token] == ["COMPLETED"]
    other = stack.run("echo", {})["id"]
    with stack.client(handle["publicAccessToken"]) as browser:
        shape = browser.get(f"/trigger.dev/realtime/v1/runs/{other}", params={"offset": "-1"})
        assert shape.status_code == 404
        mine = browser.get(f"/trigger.dev/realtime/v1/runs/{handle['id']}", params={"offset": "-1"})
        assert mine.status_code == 200 and mine.headers["electric-handle"] == handle["id"]
        assert mine.json()[-1] == {"headers": {"control": "up-to-date"}}


def test_an_idempotency_key_reset_lets_the_next_trigger_make_a_new_run(
    node: NodeSDK, stack: Stack
) -> None:
    key = stack.new_key("sdk-reset")
    options = {"idempotencyKey": "reset-me"}
    first = sdk(node, stack, "trigger", key=key, task="echo", payload={}, options=options)
    again = sdk(node, stack, "trigger", key=key, task="echo", payload={}, options=options)
    assert again["id"] == first["id"] and again["isCached"]
    # Outside a task the SDK hashes a key without a run: "global", to reset it.
    reset = sdk(
        node,
        stack,
        "resetKey",
        key=key,
        task="echo",
        idempotency="reset-me",
        options={"scope": "global"},
    )
    assert reset["id"] and "error" not in reset
    fresh = sdk(node, stack, "trigger", key=key, task="echo", payload={}, options=options)
    assert fresh["id"] != first["id"] and not fresh["isCached"]
    missing = sdk(
        node,
        stack,
        "resetKey",
        key=key,
        task="echo",
        idempotency="never-used",
        options={"scope": "global"},
    )
    assert missing["error"]["status"] == 404


def test_schedules_made_with_the_sdk_tick_and_deduplicate(node: NodeSDK, stack: Stack) -> None:
    key = stack.new_key("sdk-schedules")
    made = {"task": "echo", "cron": "0 9 * * *", "deduplicationKey": "daily", "externalId": "u-1"}
    first, again, listed = sdk(
        node,
        stack,
        "schedules",
        key=key,
        actions=[
            ["create", made],
            ["create", {**made, "cron": "*/1 * * * * *", "timezone": "Europe/Berlin"}],
            ["list"],
        ],
    )
    assert again["id"] == first["id"] and again["generator"]["expression"] == "*/1 * * * * *"
    assert again["externalId"] == "u-1" and again["deduplicationKey"] == "daily"
    assert again["timezone"] == "Europe/Berlin" and again["active"] is True and again["nextRun"]
    assert [s["id"] for s in listed["data"]] == [first["id"]] and listed["count"] == 1

    with stack.client(key) as client:
        ticked = wait_until(
            lambda: [
                r
                for r in client.get("/api/v1/runs", params={"limit": 5}).json()["data"]
                if r["schedule_id"] == first["id"]
            ],
            what="a tick of the schedule",
        )
    of_schedule = sdk(node, stack, "list", key=key, filters={"schedule": first["id"]})
    assert ticked[-1]["id"] in [r["id"] for r in of_schedule]
    run = sdk(node, stack, "poll", key=key, id=ticked[-1]["id"])
    assert run["status"] == "COMPLETED" and run["schedule"]["id"] == first["id"]
    assert run["schedule"]["externalId"] == "u-1"
    assert run["output"] == {"type": "IMPERATIVE", "externalId": "u-1", "timezone": "Europe/Berlin"}

    off, on, updated, retrieved, deleted = sdk(
        node,
        stack,
        "schedules",
        key=key,
        actions=[
            ["deactivate", first["id"]],
            ["activate", first["id"]],
            ["update", first["id"], {"task": "echo", "cron": "0 10 * * *", "externalId": "u-2"}],
            ["retrieve", first["id"]],
            ["del", first["id"]],
        ],
    )
    assert off["active"] is False and not off.get("nextRun")
    assert on["active"] is True and on["nextRun"]
    assert updated["generator"]["expression"] == "0 10 * * *" and updated["externalId"] == "u-2"
    assert retrieved["externalId"] == "u-2" and deleted == {"id": first["id"]}
    gone = sdk(node, stack, "schedules", key=key, actions=[["retrieve", first["id"]]])
    assert gone["error"]["status"] == 404
    bad = sdk(node, stack, "schedules", key=key, actions=[["create", {**made, "cron": "nope"}]])
    assert bad["error"]["status"] == 422


def test_a_browser_on_an_allowed_origin_may_follow_a_run_as_the_sdk_does(stack: Stack) -> None:
    """``useRealtimeRun`` in a browser: its headers pass CORS, and the shape's
    headers are readable from script."""
    url = f"{stack.base_url}/trigger.dev/realtime/v1/runs/run_x"
    asked = "authorization, trigger-version, x-trigger-api-version, x-trigger-electric-version"
    preflight = httpx.options(
        url,
        headers={
            "origin": "http://app.example",
            "access-control-request-method": "GET",
            "access-control-request-headers": asked,
        },
    )
    assert preflight.status_code == 200, preflight.text
    run_id = stack.run("echo", {})["id"]
    with stack.client() as client:
        shape = client.get(
            f"/trigger.dev/realtime/v1/runs/{run_id}",
            params={"offset": "-1"},
            headers={"origin": "http://app.example"},
        )
    exposed = shape.headers["access-control-expose-headers"].lower()
    assert "electric-offset" in exposed and "electric-handle" in exposed


def test_tags_and_metadata_as_a_task_of_the_sdk_would_send_them(
    node: NodeSDK, stack: Stack
) -> None:
    key = stack.new_key("sdk-annotate")
    handle = sdk(node, stack, "trigger", key=key, task="echo", payload={}, options={"tags": ["a"]})
    done = sdk(
        node,
        stack,
        "annotate",
        key=key,
        id=handle["id"],
        tags=["b", "a"],
        metadata={"progress": 0, "steps": ["start"]},
        operations=[
            {"type": "increment", "key": "progress", "value": 0.5},
            {"type": "append", "key": "steps", "value": "crop"},
            {"type": "set", "key": "stage", "value": "cropping"},
        ],
    )
    expected = {"progress": 0.5, "steps": ["start", "crop"], "stage": "cropping"}
    assert done["updated"]["metadata"] == expected and done["read"]["metadata"] == expected
    assert done["tags"] == ["a", "b"] and done["runMetadata"] == expected
    too_many = sdk(
        node,
        stack,
        "annotate",
        key=key,
        id=handle["id"],
        tags=[f"t{n}" for n in range(10)],
        metadata=None,
        operations=[],
    )
    assert too_many["error"]["status"] == 422
    stranger = sdk(
        node, stack, "annotate", id=handle["id"], tags=["x"], metadata=None, operations=[]
    )
    assert stranger["error"]["status"] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/v1/tasks/echo/trigger", b"{not json", 400),
        ("POST", "/api/v1/tasks/echo/trigger", b"[1, 2]", 422),
        ("POST", "/api/v1/tasks/echo/trigger", b'{"options": "fast"}', 422),
        ("POST", "/api/v1/tasks/echo/trigger", b'{"options": {"delay": {"at": 1}}}', 422),
        (
            "POST",
            "/api/v1/tasks/echo/trigger",
            b'{"payload": "{\\"json\\": 1, \\"meta\\": {\\"values\\": {\\"a.b\\": [\\"Date\\"]}}}",'
            b' "options": {"payloadType": "application/super+json"}}',
            422,
        ),
        (
            "POST",
            "/api/v1/tasks/echo/trigger",
            b'{"payload": "nope", "options": {"payloadType": "application/json"}}',
            400,
        ),
        ("GET", "/api/v1/runs?page[size]=0", b"", 422),
        ("GET", "/api/v1/runs?filter[createdAt][from]=yesterday", b"", 422),
        ("GET", "/api/v1/runs?filter[createdAt][period]=forever", b"", 422),
        ("GET", "/api/v1/runs?page[after]=not-a-run", b"", 400),
        ("GET", "/realtime/v1/runs/run_x?offset=abc", b"", 400),
        ("POST", "/api/v3/batches", b'{"runCount": 0}', 422),
        ("POST", "/api/v3/batches/batch_none/items", b'{"index": 0, "task": "echo"}\n', 404),
        ("POST", "/api/v1/waitpoints/tokens", b'{"timeout": "soon"}', 422),
        ("POST", "/api/v1/queues/echo/pause", b'{"action": "stop"}', 422),
        ("POST", "/api/v1/queues/echo/concurrency/override", b'{"concurrencyLimit": true}', 422),
        ("GET", "/api/v1/queues?page=x", b"", 422),
        ("GET", "/api/v1/schedules?perPage=1000", b"", 422),
        (
            "POST",
            "/api/v1/schedules",
            b'{"task": "echo", "cron": "0 0 31 2 *", "deduplicationKey": "k"}',
            422,
        ),
        ("PUT", "/api/v1/runs/run_x/metadata", b'{"operations": [{"type": "explode"}]}', 404),
        ("POST", "/api/v1/idempotencyKeys/k/reset", b"{}", 422),
    ],
)
def test_bad_requests_to_the_room_are_clear_errors(
    stack: Stack, method: str, path: str, body: bytes, status: int
) -> None:
    with stack.client() as client:
        answer = client.request(
            method,
            "/trigger.dev" + path,
            content=body or None,
            headers={"content-type": "application/json"} if body else {},
        )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"], answer.text
