"""A PostgreSQL server of a test's own (initdb'd for it), to stop, restart or
cut off without disturbing the suite's shared server.

On loopback with a free port by default, or on a lab host of ``tests/netns.py``.
It needs PostgreSQL's server binaries, a ``postgres`` user and ``runuser``;
:func:`missing` says which is absent.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.embedded_redis import free_port

if TYPE_CHECKING:
    from tests import netns

__all__ = ["PG_BIN", "Postgres", "missing"]

PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=None)


def missing() -> str | None:
    """Why a server of our own cannot be run here, or ``None``."""
    if PG_BIN is None or not (PG_BIN / "pg_ctl").exists():
        return "PostgreSQL's server binaries (initdb, pg_ctl) are not installed"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no `postgres` user to run the PostgreSQL server as"
    if shutil.which("runuser") is None:
        return "`runuser` (util-linux) is not installed"
    return None


class Postgres:
    """A PostgreSQL server of its own, on 127.0.0.1 or on a lab host.

    :param lab: the lab whose host serves it (``None``: this machine's loopback)
    :param host: the lab host's name
    """

    def __init__(self, lab: netns.Lab | None = None, host: str = "") -> None:
        assert PG_BIN is not None
        self.lab = lab
        self.host = host
        self.home = Path(tempfile.mkdtemp(prefix="gwt-pg-"))
        shutil.chown(self.home, "postgres")
        self.data = self.home / "data"
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "--auth=trust",
            "--username=gateway",
            "--encoding=UTF8",
            "--no-sync",
        )
        if lab is not None:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {lab.network} trust\n")
            address, port = lab.hosts[host].address, 5432
        else:
            address, port = "127.0.0.1", free_port()
        self.options = (
            f"-c listen_addresses={address} -c port={port} -c unix_socket_directories={self.home}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=300"
        )
        self.url = f"postgresql://gateway@{address}:{port}/postgres"

    @property
    def async_url(self) -> str:
        """The URL as the gateway takes it (asyncpg)."""
        return self.url.replace("postgresql://", "postgresql+asyncpg://")

    def _as_postgres(self, *args: str, on_host: bool = False) -> None:
        command = ["runuser", "-u", "postgres", "--", *args]
        if on_host and self.lab is not None:
            result = self.lab.run(self.host, command)
        else:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    def pg_ctl(self, *args: str) -> None:
        assert PG_BIN is not None
        log = str(self.home / "server.log")
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-w", *args, on_host=True
        )

    def start(self) -> Postgres:
        self.pg_ctl("-o", self.options, "start")
        return self

    def stop(self) -> None:
        """Stop the server (fast: connections are closed)."""
        self.pg_ctl("-m", "fast", "stop")

    def restart(self) -> None:
        """Stop the server (fast: connections are closed) and start it again."""
        self.pg_ctl("-m", "fast", "-o", self.options, "restart")

    def close(self) -> None:
        try:
            self.pg_ctl("-m", "immediate", "stop")
        except AssertionError:
            pass
        shutil.rmtree(self.home, ignore_errors=True)
