"""``gateway up``: everything on one machine under one process.

Migrates the database, starts an embedded Redis when ``REDIS_URL`` is unset,
makes sure a dev project and key exist, then runs ``gateway web`` and
``gateway worker`` as children, and keeps them running:

- a child that exits is started again, after a pause that doubles with each
  quick crash (1 s up to 30 s; a child that ran a minute starts the count
  again), and the supervisor says so;
- only Ctrl-C or SIGTERM stops everything: the web process first (no new
  work comes in), then the worker, then Redis, each given time to finish;
- the children die with the supervisor, however it ends (kill -9, the OOM
  killer): each watches a pipe from it, and on Linux also asks the kernel
  for SIGTERM when its parent dies; an embedded Redis left by a killed
  supervisor (its pid file says which) is stopped before a new one starts;
- one ``gateway up`` per data folder: it holds ``DATA_DIR/gateway-up.lock``,
  and a second one says which process has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO

from gateway.cli.embedded_redis import EmbeddedRedis
from gateway.settings import Settings

__all__ = ["SUPERVISOR_FD", "up", "watch_supervisor"]

#: The environment variable naming the pipe a child watches: when it reads
#: end-of-file, its supervisor is gone and it stops.
SUPERVISOR_FD = "GATEWAY_SUPERVISOR_FD"
#: A child that ran this long before it exited starts the backoff afresh.
HEALTHY_AFTER = 60.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
_PR_SET_PDEATHSIG = 1


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


# -- dying with the supervisor ---------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process
    dies; ``None`` elsewhere (the pipe alone does it there)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took
            os._exit(1)

    return preexec


def watch_supervisor() -> None:
    """In a child of ``gateway up``: stop (SIGTERM to itself) when the pipe
    from the supervisor reads end-of-file, which is when the supervisor is
    gone however it ended."""
    value = os.environ.pop(SUPERVISOR_FD, None)
    if not value:
        return
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError):
        return
    import threading

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 1):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


# -- one supervisor per data folder -----------------------------------------


class AlreadyRunning(Exception):
    """Another ``gateway up`` holds the data folder's lock."""


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold ``DATA_DIR/gateway-up.lock`` (the kernel lets go of it when this
    process ends, however it ends), with this process's pid in it."""
    path = data_dir / "gateway-up.lock"
    handle: IO[str] = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise AlreadyRunning(
                f"another `gateway up` (pid {holder}) is running on {data_dir}; "
                "stop it first, or set DATA_DIR to another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _stop_stale_redis(redis_dir: Path) -> None:
    """Stop an embedded Redis that a killed ``gateway up`` left on this folder
    (we hold the folder's lock, so no live supervisor owns it)."""
    pidfile = redis_dir / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if not _is_redis(pid):
        pidfile.unlink(missing_ok=True)
        return
    print(f"gateway: stopping the embedded Redis (pid {pid}) a stopped `gateway up` left")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _is_redis(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _is_redis(pid):
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def _is_redis(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return b"redis-server" in cmdline.read_bytes()
        except OSError:
            return False
    return True  # no /proc: the pid file is ours, and the process lives


# -- children ----------------------------------------------------------------


@dataclasses.dataclass
class Child:
    """A command the supervisor keeps running."""

    name: str
    args: list[str]
    env: dict[str, str]
    watch_fd: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    crashes: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args,
            env={**self.env, SUPERVISOR_FD: str(self.watch_fd)},
            pass_fds=(self.watch_fd,),
            # Own sessions: Ctrl-C reaches only the supervisor, which stops
            # the children in order.
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        self.started = time.monotonic()
        self.restart_at = None
        print(f"gateway: {self.name} started (pid {self.process.pid})", flush=True)

    def check(self) -> None:
        """Notice an exit and plan the restart; restart when it is time."""
        now = time.monotonic()
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
            return
        if self.process is None or self.process.poll() is None:
            return
        if now - self.started >= HEALTHY_AFTER:
            self.crashes = 0
        self.crashes += 1
        pause = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self.crashes - 1))
        print(
            f"gateway: {self.name} exited with code {self.process.returncode}; "
            f"starting it again in {pause:g} s (restart {self.crashes})",
            file=sys.stderr,
            flush=True,
        )
        self.restart_at = now + pause

    def stop(self, grace: float) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            print(
                f"gateway: {self.name} did not stop in {grace:.0f} s; killing it", file=sys.stderr
            )
            process.kill()
            process.wait()


def _wait_healthy(url: str, child: Child, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process is None or child.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _port_free(host: str, port: int, wait: float = 10.0) -> bool:
    """Whether ``host:port`` can be bound, waiting up to ``wait`` seconds (a
    web process of a killed supervisor may still be stopping)."""
    deadline = time.monotonic() + wait
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.2)


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
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _data_dir_lock(data_dir):
            return _up(settings)
    except AlreadyRunning as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1


def _up(settings: Settings) -> int:
    from db.migrate import upgrade

    data_dir = settings.data_dir
    secret = settings.secret_key or _read_or_create(
        data_dir / "secret-key", secrets.token_urlsafe(32)
    )
    settings = settings.replace(secret_key=secret)
    loopback_allowed = not settings.webhook_allowed_networks
    if loopback_allowed:
        # On one machine, callbacks to a local app are the point: allow loopback.
        settings = settings.replace(webhook_allowed_networks=("127.0.0.0/8", "::1/128"))
    if not _port_free(settings.host, settings.port):
        print(
            f"gateway: port {settings.port} on {settings.host} is in use: stop what listens "
            "there, or set PORT",
            file=sys.stderr,
        )
        return 1

    upgrade(settings.database_url)

    redis: EmbeddedRedis | None = None
    redis_url = settings.redis_url
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # The children read end-of-file here when this process is gone.
    watch_read, watch_write = os.pipe()
    children: list[Child] = []
    try:
        if not redis_url:
            _stop_stale_redis(data_dir / "redis")
            redis = EmbeddedRedis(data_dir / "redis", preexec_fn=_die_with_parent()).start()
            redis_url = redis.url
        key = _dev_key(settings)
        env = {
            **os.environ,
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": redis_url,
            "GATEWAY_SECRET_KEY": secret,
            "HOST": settings.host,
            "PORT": str(settings.port),
            "GATEWAY_URL": settings.gateway_url,
            "WEBHOOK_ALLOWED_NETWORKS": ",".join(settings.webhook_allowed_networks),
        }
        command = [sys.executable, "-m", "gateway"]
        web = Child("web", [*command, "web"], env, watch_read)
        children.append(web)
        web.start()
        public_url = f"http://{settings.host}:{settings.port}"
        if not _wait_healthy(public_url, web):
            print("gateway: the web process did not start; see its output above", file=sys.stderr)
            return 1
        worker = Child("worker", [*command, "worker"], env, watch_read)
        children.append(worker)
        worker.start()
        if settings.webhook_dispatcher:
            dispatcher = Child("dispatch", [*command, "dispatch"], env, watch_read)
            children.append(dispatcher)
            dispatcher.start()
        print(_banner(public_url, redis_url, redis, settings.database_url, key), flush=True)
        if loopback_allowed:
            print(
                "  note: callbacks may go to loopback addresses (127.0.0.0/8, ::1), so a local\n"
                "  app can receive them; set WEBHOOK_ALLOWED_NETWORKS to change that.\n",
                flush=True,
            )
        while not stopping:
            if redis is not None and redis.process is not None and redis.process.poll() is not None:
                print(
                    f"gateway: the embedded Redis exited with code {redis.process.returncode}; "
                    "starting it again",
                    file=sys.stderr,
                    flush=True,
                )
                redis.start()
            for child in children:
                child.check()
            time.sleep(0.2)
        return 0
    finally:
        for child in children:
            child.stop(grace=15.0)
        if redis is not None:
            redis.stop()
        os.close(watch_write)
        os.close(watch_read)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        print("gateway: stopped", flush=True)
