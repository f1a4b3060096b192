"""Processes and waits shared by the tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa

from db.engine import Database

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Process:
    """A child process of ours (``python -m gateway ...``) with its output in a file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, *self.args],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_http_ok(url: str, process: Process, timeout: float = 30.0) -> None:
    def ready() -> bool:
        if not process.alive:
            raise AssertionError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=timeout, what=f"{url} to answer")


def db_call(url: str, fn: Callable[[sa.Connection], T], *, write: bool = False) -> T:
    """``fn(conn)`` in one transaction against the real database at ``url``."""

    async def run() -> T:
        db = Database(url)
        try:
            return await (db.write(fn) if write else db.read(fn))
        finally:
            await db.dispose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run())
    # A loop runs in this thread (Playwright's sync API keeps one): use another.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def db_query(url: str, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
    """Rows of ``sql`` against the real database at ``url``; a tuple parameter
    is a list (``WHERE id IN :ids``)."""
    values = dict(params or {})
    statement = sa.text(sql).bindparams(
        *(sa.bindparam(k, expanding=True) for k, v in values.items() if isinstance(v, tuple))
    )
    return db_call(url, lambda conn: list(conn.execute(statement, values)))


def need(missing: str | None) -> None:
    """Skip the test for what this machine lacks (``missing``), except under
    CI=true, where every test must run: there it fails, saying what is missing."""
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test: {missing}")
    pytest.skip(missing)


def gateway_cmd(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` to its end, its output kept."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=dict(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def child_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(overrides)
    return env


def dashboard_session(base_url: str, key: str) -> httpx.Client:
    """An HTTP client signed in to the dashboard with ``key`` (its form, CSRF
    token and session cookie, as a browser would)."""
    import re

    client = httpx.Client(base_url=base_url, timeout=20)
    form = client.get("/dashboard/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert csrf, form
    signed = client.post(
        "/dashboard/login",
        data={"api_key": key, "next": "/dashboard/runs", "csrf_token": csrf.group(1)},
    )
    assert signed.status_code == 303, signed.text
    return client
