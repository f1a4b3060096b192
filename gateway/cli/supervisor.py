"""``gateway up``: everything on one machine under one process.

Migrates the database, starts an embedded Redis when ``REDIS_URL`` is unset,
makes sure a dev project and key exist, then runs ``gateway web`` and
``gateway worker`` as children. Ctrl-C (or SIGTERM) stops the web process,
then the worker, then Redis, each given time to finish cleanly.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from gateway.cli.embedded_redis import EmbeddedRedis
from gateway.settings import Settings

__all__ = ["up"]


def _read_or_create(path: Path, make: str) -> str:
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(make + "\n")
    return make


def _dev_key(settings: Settings) -> str:
    """The dev project's key, kept in ``DATA_DIR/dev-api-key`` between runs."""
    from db.engine import Database
    from gateway.auth.keys import api_key_exists, create_api_key

    path = settings.data_dir / "dev-api-key"

    async def ensure() -> str:
        db = Database(settings.database_url)
        try:
            if path.exists():
                key = path.read_text().strip()
                if key and await api_key_exists(db, key):
                    return key
            _, key = await create_api_key(db, "dev")
            return key
        finally:
            await db.dispose()

    key = asyncio.run(ensure())
    path.unlink(missing_ok=True)
    return _read_or_create(path, key)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes], name: str, grace: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        print(f"gateway: {name} did not stop in {grace:.0f} s; killing it", file=sys.stderr)
        process.kill()
        process.wait()


def _banner(
    url: str, redis_url: str, redis: EmbeddedRedis | None, database_url: str, key: str
) -> str:
    embedded = f" (embedded, data in {redis.data_dir})" if redis else ""
    auth = f"-H 'Authorization: Bearer {key}'"
    return "\n".join(
        [
            "",
            f"  gateway   {url}",
            f"  dashboard {url}/dashboard  (sign in with the API key)",
            f"  redis     {redis_url}{embedded}",
            f"  database  {database_url}",
            f"  API key   {key}",
            "",
            f"  trigger:  curl -s -X POST {url}/api/v1/tasks/echo/trigger {auth} \\",
            """              -d '{"payload": {"hello": "world"}}'""",
            f"  result:   curl -s '{url}/api/v1/runs/RUN_ID?wait=30' {auth}",
            "",
            "  Ctrl-C stops everything.",
            "",
        ]
    )


def up(settings: Settings) -> int:
    from db.migrate import upgrade

    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = settings.secret_key or _read_or_create(
        data_dir / "secret-key", secrets.token_urlsafe(32)
    )
    settings = settings.replace(secret_key=secret)
    loopback_allowed = not settings.webhook_allowed_networks
    if loopback_allowed:
        # On one machine, callbacks to a local app are the point: allow loopback.
        settings = settings.replace(webhook_allowed_networks=("127.0.0.0/8", "::1/128"))

    upgrade(settings.database_url)

    redis: EmbeddedRedis | None = None
    redis_url = settings.redis_url
    if not redis_url:
        redis = EmbeddedRedis(data_dir / "redis").start()
        redis_url = redis.url

    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        key = _dev_key(settings)
        env = {
            **os.environ,
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": redis_url,
            "GATEWAY_SECRET_KEY": secret,
            "PORT": str(settings.port),
            "GATEWAY_URL": settings.gateway_url,
            "WEBHOOK_ALLOWED_NETWORKS": ",".join(settings.webhook_allowed_networks),
        }
        command = [sys.executable, "-m", "gateway"]
        # Own sessions: Ctrl-C reaches only this process, which stops the
        # children in order (web first, so no new work comes in; Redis last).
        web = subprocess.Popen([*command, "web"], env=env, start_new_session=True)
        children.append(("web", web))
        public_url = f"http://{settings.host}:{settings.port}"
        if not _wait_healthy(public_url, web):
            print("gateway: the web process did not start; see its output above", file=sys.stderr)
            return 1
        worker = subprocess.Popen([*command, "worker"], env=env, start_new_session=True)
        children.append(("worker", worker))
        print(_banner(public_url, redis_url, redis, settings.database_url, key), flush=True)
        if loopback_allowed:
            print(
                "  note: callbacks may go to loopback addresses (127.0.0.0/8, ::1), so a local\n"
                "  app can receive them; set WEBHOOK_ALLOWED_NETWORKS to change that.\n",
                flush=True,
            )
        while not stopping:
            for name, process in children:
                if process.poll() is not None:
                    print(
                        f"gateway: {name} exited with {process.returncode}; stopping",
                        file=sys.stderr,
                    )
                    stopping = True
            time.sleep(0.2)
        return 0
    finally:
        for name, process in children:
            _stop(process, name, grace=15.0)
        if redis is not None:
            redis.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        print("gateway: stopped", flush=True)
