"""Hosts made of Linux network namespaces, on one switch, for the multi-host test.

Each host is a namespace with one veth link to a bridge that lives in a
namespace of its own (the switch), and an address of a private /24 that exists
nowhere else. Cutting a host takes its port on the switch down: its packets
vanish, as when a cable is pulled, and connections hang rather than fail.

The test process talks from a host of its own too: :meth:`Lab.client` is a
thread pool whose threads joined that host's namespace (a network namespace
belongs to a thread), so sockets made in it are that host's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000


def missing() -> str | None:
    """Why network namespaces cannot be made here, or ``None`` if they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclasses.dataclass
class Host:
    name: str
    namespace: str
    address: str
    #: The switch's end of the host's link.
    port: str


class Lab:
    """Namespaces on one switch; everything made is removed by :meth:`close`."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.77.{secrets.randbelow(200) + 20}"
        self.switch = f"gwt{self.tag}-switch"
        self.hosts: dict[str, Host] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self._pools: list[concurrent.futures.ThreadPoolExecutor] = []
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str, last_octet: int) -> Host:
        namespace = f"gwt{self.tag}-{name}"
        index = len(self.hosts)
        inside, port = f"v{self.tag}{index}h", f"v{self.tag}{index}s"
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", inside, "type", "veth", "peer", "name", port)
        _run("ip", "link", "set", inside, "netns", namespace)
        _run("ip", "link", "set", port, "netns", self.switch)
        _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        address = f"{self.subnet}.{last_octet}"
        _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        _run("ip", "-n", namespace, "link", "set", inside, "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        host = Host(name, namespace, address, port)
        self.hosts[name] = host
        return host

    @property
    def network(self) -> str:
        return f"{self.subnet}.0/24"

    def cut(self, name: str) -> None:
        """Pull the host's cable: its port on the switch goes down."""
        _run("ip", "-n", self.switch, "link", "set", self.hosts[name].port, "down")

    def mend(self, name: str) -> None:
        _run("ip", "-n", self.switch, "link", "set", self.hosts[name].port, "up")

    @contextlib.contextmanager
    def cut_off(self, name: str) -> Iterator[None]:
        self.cut(name)
        try:
            yield
        finally:
            self.mend(name)

    def popen(
        self,
        name: str,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Run ``args`` on host ``name`` (``ip netns exec`` execs it: same pid)."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[name].namespace, *args],
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self.processes.append(process)
        return process

    def run(self, name: str, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts[name].namespace, *args],
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )

    def client(self, name: str, threads: int = 8) -> concurrent.futures.ThreadPoolExecutor:
        """Threads that live on host ``name``: what they connect or bind is its."""
        namespace = self.hosts[name].namespace
        libc = ctypes.CDLL(None, use_errno=True)

        def enter() -> None:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {namespace}")
            finally:
                os.close(fd)

        pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix=f"on-{name}", initializer=enter
        )
        self._pools.append(pool)
        return pool

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)


def on(pool: concurrent.futures.ThreadPoolExecutor, fn: Callable[[], T], timeout: float = 120) -> T:
    """``fn()`` run on the pool's host."""
    return pool.submit(fn).result(timeout)
