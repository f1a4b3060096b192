"""The Python client and the CLI, against the served gateway."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from gateway.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from tests.conftest import Stack
from tests.helpers import ROOT
from tests.receiver import Receiver


def test_trigger_wait_stream_and_errors(stack: Stack) -> None:
    with Client(stack.base_url, stack.api_key) as gw:
        run = gw.trigger("echo", {"hello": "client"}, tags=["py"])
        assert run["status"] == "QUEUED" and run["tags"] == ["py"]
        done = gw.wait(run["id"])
        assert done["status"] == "COMPLETED" and done["output"] == {"hello": "client"}

        # wait(timeout=…) is wait(within=…): the run as it is when time is up.
        sleeping = gw.trigger("sleep", {"seconds": 5})
        assert gw.wait(sleeping["id"], timeout=0.2)["is_final"] is False
        gw.cancel(sleeping["id"])

        slow = gw.trigger("sleep", {"seconds": 0.3})
        statuses = [event["status"] for event in gw.stream(slow["id"])]
        assert statuses == ["QUEUED", "EXECUTING", "COMPLETED"]

        with pytest.raises(NotFoundError) as missing:
            gw.get_run("run_nope")
        assert missing.value.code == "run_not_found" and missing.value.status_code == 404
        with pytest.raises(ValidationError) as invalid:
            gw.trigger("sleep", {"seconds": "long"})
        assert invalid.value.details[0]["path"] == "payload.seconds"
        with pytest.raises(ConflictError):
            gw.cancel(done["id"])
        again = gw.wait(gw.replay(done["id"])["id"])
        assert again["output"] == {"hello": "client"}
        key = f"client-{run['id']}"
        cached = gw.trigger("echo", {}, idempotency_key=key)
        assert gw.trigger("echo", {}, idempotency_key=key)["id"] == cached["id"]
    with Client(stack.base_url, "gw_sk_wrong") as bad, pytest.raises(AuthenticationError):
        bad.get_run(run["id"])


def test_list_runs_follows_cursors(stack: Stack) -> None:
    key = stack.new_key("client-list")
    with Client(stack.base_url, key) as gw:
        batch = gw.batch_trigger([{"task": "echo", "payload": {"n": n}} for n in range(7)])
        ids = [r["id"] for r in batch["runs"]]
        listed = [r["id"] for r in gw.list_runs(limit=3)]
        assert listed == sorted(ids, reverse=True)
        by_task = [r["id"] for r in gw.list_runs(limit=2, task=["echo"])]
        assert by_task == listed
        assert gw.get_batch(batch["batch_id"])["count"] == 7


def test_webhook_management_and_verification(stack: Stack, receiver: Receiver) -> None:
    key = stack.new_key("client-hooks")
    path = f"/client/{key[-8:]}"
    with Client(stack.base_url, key) as gw:
        endpoint = gw.create_webhook(receiver.url(path), events=["run.completed"])
        assert [e["id"] for e in gw.list_webhooks()["data"]] == [endpoint["id"]]
        run = gw.wait(gw.trigger("echo", {"v": 1})["id"])
        [call] = receiver.wait_calls(path, 1)
        event = gw.verify_webhook(call.body, call.headers, endpoint["secret"])
        assert event["data"]["id"] == run["id"]
        page = gw.webhook_deliveries(endpoint["id"])
        assert page["data"][0]["run_id"] == run["id"]
        # Page by page, and all of them.
        more = [gw.trigger("echo", {"v": n})["id"] for n in range(4)]
        for run_id in more:
            gw.wait(run_id, timeout=30)
        receiver.wait_calls(path, 5)
        first = gw.webhook_deliveries(endpoint["id"], limit=2)
        assert len(first["data"]) == 2 and first["next_cursor"]
        second = gw.webhook_deliveries(endpoint["id"], limit=2, cursor=first["next_cursor"])
        assert {d["id"] for d in first["data"]}.isdisjoint(d["id"] for d in second["data"])
        every = list(gw.iter_webhook_deliveries(endpoint["id"], limit=2))
        assert {d["run_id"] for d in every} == {run["id"], *more}
        assert gw.update_webhook(endpoint["id"], description="x")["description"] == "x"
        gw.delete_webhook(endpoint["id"])
        assert gw.list_webhooks()["data"] == []


def test_the_async_client(stack: Stack) -> None:
    async def main() -> None:
        async with AsyncClient(stack.base_url, stack.api_key) as gw:
            runs = await asyncio.gather(*(gw.trigger("echo", {"n": n}) for n in range(5)))
            finals = await asyncio.gather(*(gw.wait(r["id"]) for r in runs))
            assert sorted(f["output"]["n"] for f in finals) == list(range(5))
            slow = await gw.trigger("sleep", {"seconds": 0.2})
            statuses = [e["status"] async for e in gw.stream(slow["id"])]
            assert statuses == ["QUEUED", "EXECUTING", "COMPLETED"]
            seen = [r["id"] async for r in gw.list_runs(limit=50, task="echo")]
            assert {r["id"] for r in runs} <= set(seen)
            with pytest.raises(NotFoundError):
                await gw.get_run("run_nope")

    asyncio.run(main())


def cli(stack: Stack, *args: str, key: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "GATEWAY_URL": stack.base_url, "GATEWAY_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli(stack: Stack, receiver: Receiver) -> None:
    key = stack.new_key("cli-client")
    waited = cli(stack, "trigger", "echo", "--payload", '{"from": "cli"}', "--wait", key=key)
    assert waited.returncode == 0, waited.stderr
    final = json.loads(waited.stdout)
    assert final["status"] == "COMPLETED" and final["output"] == {"from": "cli"}
    assert "COMPLETED" in waited.stderr  # the live status line

    queued = json.loads(cli(stack, "trigger", "echo", "--payload", "{}", key=key).stdout)
    assert queued["status"] == "QUEUED"
    listing = cli(stack, "runs", "list", "--limit", "5", key=key)
    assert final["id"] in listing.stdout and queued["id"] in listing.stdout
    got = json.loads(cli(stack, "runs", "get", final["id"], key=key).stdout)
    assert got["id"] == final["id"]
    refused = cli(stack, "runs", "cancel", final["id"], key=key)
    assert refused.returncode == 1 and "run_already_final" in refused.stderr
    replayed = json.loads(cli(stack, "runs", "replay", final["id"], key=key).stdout)
    assert replayed["id"] != final["id"]
    bad = cli(stack, "trigger", "sleep", "--payload", '{"seconds": "x"}', key=key)
    assert bad.returncode == 1 and "payload.seconds" in bad.stderr

    added = json.loads(
        cli(stack, "webhooks", "add", receiver.url("/cli"), "--event", "run.failed", key=key).stdout
    )
    assert added["secret"].startswith("whsec_")
    assert added["id"] in cli(stack, "webhooks", "list", key=key).stdout
    listed = cli(stack, "webhooks", "deliveries", added["id"], key=key)
    assert listed.returncode == 0 and listed.stdout == ""  # no run failed
    since = final["created_at"]
    recover = cli(
        stack, "webhooks", "recover", added["id"], "--since", since, "--include-pending", key=key
    )
    assert recover.returncode == 0, recover.stderr
    assert json.loads(recover.stdout) == {
        "count": 0,
        "delivery_ids": [],
        "failed": [],
        "pending": [],
    }
    assert cli(stack, "webhooks", "rm", added["id"], key=key).returncode == 0
    assert added["id"] not in cli(stack, "webhooks", "list", key=key).stdout


#: What the server needs and the client must not: the client installs alone.
SERVER_PACKAGES = (
    "alembic",
    "arq",
    "asyncpg",
    "google",
    "itsdangerous",
    "jinja2",
    "PIL",
    "prometheus_client",
    "pydantic",
    "pydantic_settings",
    "redis",
    "sqlalchemy",
    "sqlmodel",
    "starlette",
    "uvicorn",
)

_WITHOUT_THE_SERVER = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Blocked())
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_client_and_its_cli_need_none_of_the_server(stack: Stack) -> None:
    key = stack.new_key("client-alone")
    script = _WITHOUT_THE_SERVER.format(blocked=SERVER_PACKAGES)
    env = {**os.environ, "GATEWAY_URL": stack.base_url, "GATEWAY_API_KEY": key}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    waited = run("trigger", "echo", "--payload", '{"alone": true}', "--wait")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["output"] == {"alone": True}
    # A server command says what to install, in one line.
    server = run("web")
    assert server.returncode != 0
    assert "pip install 'webhook-job-gateway[server]'" in server.stderr
    assert "Traceback" not in server.stderr


def test_every_cli_group_lists_its_actions_and_rotates_a_webhook_secret(
    stack: Stack, receiver: Receiver
) -> None:
    key = stack.new_key("cli-help")
    for group, actions in (
        ("queues", ("list", "get", "create", "limit", "pause", "resume")),
        ("schedules", ("list", "create", "get", "rm", "enable", "disable")),
        ("waitpoints", ("create", "get", "complete")),
        ("webhooks", ("add", "list", "rm", "rotate-secret", "deliveries", "recover")),
        ("runs", ("list", "get", "cancel", "replay", "logs", "bulk-cancel")),
    ):
        shown = cli(stack, group, "--help", key=key)
        assert shown.returncode == 0, shown.stderr
        for action in actions:
            assert f"\n    {action}" in shown.stdout, (group, action, shown.stdout)
    added = json.loads(cli(stack, "webhooks", "add", receiver.url("/rotated"), key=key).stdout)
    rotated = cli(stack, "webhooks", "rotate-secret", added["id"], "--grace", "60", key=key)
    assert rotated.returncode == 0, rotated.stderr
    answer = json.loads(rotated.stdout)
    assert answer["secret"].startswith("whsec_") and answer["secret"] != added["secret"]
