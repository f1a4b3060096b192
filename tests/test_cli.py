"""The ``gateway`` command: ``keys create``, ``migrate`` and the whole ``up``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from gateway.cli.embedded_redis import free_port
from tests.conftest import Stack
from tests.helpers import ROOT, child_env, wait_until
from tests.receiver import Receiver


def gateway_cmd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_create_prints_the_key_alone_on_the_last_line(stack: Stack) -> None:
    result = gateway_cmd("keys", "create", "cli-project", env=stack.env)
    assert result.returncode == 0, result.stderr
    key = result.stdout.rstrip("\n").splitlines()[-1]
    assert re.fullmatch(r"gw_sk_[A-Za-z0-9_-]{43}", key)
    # Only the hash is stored.
    assert stack.query("SELECT COUNT(*) FROM api_keys WHERE key_hash = :k", k=key)[0][0] == 0
    # The key works, for its own project.
    run = httpx.post(
        stack.base_url + "/api/v1/tasks/echo/trigger",
        json={"payload": 1},
        headers={"authorization": f"Bearer {key}"},
    )
    assert run.status_code == 202
    # A second key for the same project name joins the same project.
    again = gateway_cmd("keys", "create", "cli-project", env=stack.env)
    second = again.stdout.rstrip("\n").splitlines()[-1]
    assert second != key
    with httpx.Client(
        base_url=stack.base_url, headers={"authorization": f"Bearer {second}"}
    ) as client:
        assert client.get(f"/api/v1/runs/{run.json()['id']}").status_code == 200
    assert stack.query("SELECT COUNT(*) FROM projects WHERE name = 'cli-project'")[0][0] == 1


def test_configuration_errors_say_what_to_set(tmp_path: Path) -> None:
    env = child_env(DATA_DIR=str(tmp_path), REDIS_URL="redis://127.0.0.1:1")
    env.pop("GATEWAY_SECRET_KEY", None)
    result = gateway_cmd("worker", env=env)
    assert result.returncode == 2
    assert "GATEWAY_SECRET_KEY" in result.stderr
    bad = gateway_cmd("migrate", env={**env, "PORT": "eighty"})
    assert bad.returncode == 2
    assert "PORT" in bad.stderr


def test_gateway_up_runs_everything_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = child_env(DATA_DIR=str(tmp_path / "data"), PORT=str(port))
    for name in (
        "REDIS_URL",
        "DATABASE_URL",
        "GATEWAY_SECRET_KEY",
        "GATEWAY_URL",
        "WEBHOOK_ALLOWED_NETWORKS",
    ):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "up"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    key_found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if "API key" in line:
                key_found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert key_found.wait(60), "".join(output)
        banner = "".join(output)
        assert f"http://127.0.0.1:{port}" in banner
        assert "(embedded" in banner
        key = re.search(r"API key\s+(gw_sk_\S+)", banner).group(1)  # type: ignore[union-attr]
        assert (tmp_path / "data" / "gateway.db").exists()
        assert (tmp_path / "data" / "redis").is_dir()

        receiver = Receiver().start()
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"authorization": f"Bearer {key}"},
                timeout=40,
            ) as client:
                # `gateway up` lets callbacks reach a local app on loopback.
                endpoint = client.post("/api/v1/webhooks", json={"url": receiver.url("/up")})
                assert endpoint.status_code == 201, endpoint.text
                receiver.verify_with("/up", endpoint.json()["secret"])
                accepted = client.post("/api/v1/tasks/echo/trigger", json={"payload": {"hi": 1}})
                assert accepted.status_code == 202
                run = client.get(accepted.headers["location"], params={"wait": 30}).json()
            assert run["status"] == "COMPLETED"
            assert run["output"] == {"hi": 1}
            [call] = receiver.wait_calls("/up", 1)
            assert call.verified_by and call.json()["data"]["id"] == run["id"]
        finally:
            receiver.stop()
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
        reader.join(10)
        assert process.stdout is not None
        process.stdout.close()
    assert code == 0, "".join(output)
    assert "gateway: stopped" in "".join(output)
    assert "callbacks may go to loopback addresses" in "".join(output)
    # Nothing is left listening: the web port is free again and Redis is gone.
    wait_until(lambda: _port_free(port), timeout=5, what="the web port to be released")
    redis_pids = [p for p in _children_named("redis-server") if str(tmp_path) in _cmdline(p)]
    assert redis_pids == []


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _children_named(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
