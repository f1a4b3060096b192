"""The ``gateway`` command: ``keys create``, ``migrate`` and the whole ``up``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from gateway.cli.embedded_redis import free_port
from tests.conftest import Stack
from tests.helpers import ROOT, child_env, gateway_cmd, wait_until
from tests.receiver import Receiver


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


class Up:
    """``gateway up`` as a user runs it, its output read as it comes."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        env = child_env(DATA_DIR=str(data_dir), PORT=str(port))
        for name in (
            "REDIS_URL",
            "DATABASE_URL",
            "GATEWAY_SECRET_KEY",
            "GATEWAY_URL",
            "WEBHOOK_ALLOWED_NETWORKS",
        ):
            env.pop(name, None)
        self.env = env
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "up"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 60) -> re.Match[str]:
        """The first match of ``pattern`` in the output past character ``after``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = re.compile(pattern).search("".join(self.lines), after)
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.process.poll() is not None and not self._reader.is_alive()
                ):
                    raise AssertionError(f"no {pattern!r} in the output:\n{''.join(self.lines)}")
                self._changed.wait(min(remaining, 0.5))

    def pid_of(self, child: str, *, after: int = 0) -> tuple[int, int]:
        """The pid of the child started after ``after``, and where that was said."""
        found = self.wait_for(rf"gateway: {child} started \(pid (\d+)\)", after=after)
        return int(found.group(1)), found.end()

    def key(self) -> str:
        return self.wait_for(r"API key\s+(gw_sk_\S+)").group(1)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"authorization": f"Bearer {self.key()}"},
            timeout=40,
        )

    def echo(self, payload: object) -> dict[str, object]:
        with self.client() as client:
            accepted = client.post("/api/v1/tasks/echo/trigger", json={"payload": payload})
            assert accepted.status_code == 202, accepted.text
            run: dict[str, object] = client.get(
                accepted.headers["location"], params={"wait": 30}
            ).json()
        return run

    def stop(self, sig: int | None = signal.SIGINT) -> int:
        """Send ``sig`` (none: let it end by itself); the exit code."""
        if sig is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(60)
        self._reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


def test_gateway_up_runs_everything_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    up = Up(tmp_path / "data", port)
    try:
        key = up.key()
        banner = up.output
        assert f"http://127.0.0.1:{port}" in banner
        assert "(embedded" in banner
        assert (tmp_path / "data" / "gateway.db").exists()
        assert (tmp_path / "data" / "redis").is_dir()

        receiver = Receiver().start()
        try:
            with up.client() as client:
                # `gateway up` lets callbacks reach a local app on loopback.
                endpoint = client.post("/api/v1/webhooks", json={"url": receiver.url("/up")})
                assert endpoint.status_code == 201, endpoint.text
                receiver.verify_with("/up", endpoint.json()["secret"])
            run = up.echo({"hi": 1})
            assert run["status"] == "COMPLETED"
            assert run["output"] == {"hi": 1}
            [call] = receiver.wait_calls("/up", 1)
            assert call.verified_by and call.json()["data"]["id"] == run["id"]
            # It came from the dispatcher `gateway up` started (the default).
            dispatcher, _ = up.pid_of("dispatch")
            assert _alive(dispatcher)
        finally:
            receiver.stop()
        assert key
    finally:
        code = up.stop()
    assert code == 0, up.output
    assert "gateway: stopped" in up.output
    assert "callbacks may go to loopback addresses" in up.output
    # Nothing is left listening: the web port is free again and Redis is gone.
    wait_until(lambda: _port_free(port), timeout=5, what="the web port to be released")
    redis_pids = [p for p in _children_named("redis-server") if str(tmp_path) in _cmdline(p)]
    assert redis_pids == []


def test_gateway_up_starts_a_crashed_child_again_and_keeps_the_rest(tmp_path: Path) -> None:
    up = Up(tmp_path / "data", free_port())
    try:
        web, _ = up.pid_of("web")
        worker, said = up.pid_of("worker")
        assert up.echo("before")["status"] == "COMPLETED"

        os.kill(worker, signal.SIGKILL)
        up.wait_for(r"gateway: worker exited with code -9; starting it again in 1 s", after=said)
        again, said = up.pid_of("worker", after=said)
        assert again != worker
        # The web process never stopped, and the new worker runs what comes.
        assert _alive(web)
        assert up.echo("after")["output"] == "after"

        # The embedded Redis too: started again on its port, with its data.
        redis = int((tmp_path / "data" / "redis" / "redis.pid").read_text())
        os.kill(redis, signal.SIGKILL)
        up.wait_for(r"the embedded Redis exited with code -9; starting it again", after=said)
        assert up.echo("after redis")["output"] == "after redis"
        assert _alive(web) and up.process.poll() is None
    finally:
        assert up.stop() == 0, up.output


def test_killed_gateway_up_leaves_nothing_running_and_one_per_data_folder(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    port = free_port()
    first = Up(data, port)
    try:
        web, _ = first.pid_of("web")
        worker, _ = first.pid_of("worker")
        first.key()
        redis = int((data / "redis" / "redis.pid").read_text())
        # A second `gateway up` on the same folder says who holds it.
        second = Up(data, free_port())
        assert second.stop(None) == 1
        assert f"another `gateway up` (pid {first.process.pid}) is running" in second.output
    finally:
        first.process.kill()  # kill -9: no chance to stop anything itself
        first.stop()
    for pid, name in ((web, "web"), (worker, "worker"), (redis, "redis")):
        wait_until(lambda pid=pid: not _alive(pid), timeout=30, what=f"the {name} to stop")

    again = Up(data, port)
    try:
        assert again.echo("once more")["output"] == "once more"
    finally:
        assert again.stop() == 0, again.output


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie (dead, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


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
