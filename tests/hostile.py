"""A receiver that misbehaves on purpose, over raw TCP on loopback.

Each path answers badly in its own way; every request is recorded (path,
``webhook-id``, arrival time) before the misbehaviour starts, so a test can
wait on arrivals with a condition variable instead of sleeping.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Callable

from gateway.cli.embedded_redis import free_port

#: Path → what the receiver does once it has read the request.
BEHAVIOURS = {
    "/nul": "200 with a NUL byte in its body",
    "/invalid-utf8": "200 with bytes that are not UTF-8",
    "/trickle": "headers at once, then the body one byte a second",
    "/slow-headers": "the status line and headers one byte a second",
    "/hang": "reads the request and never answers",
    "/redirect": "302 to another address (not followed)",
    "/reset": "resets the connection (RST) instead of answering",
    "/garbage": "answers with bytes that are not HTTP",
    "/huge": "200 with a 5 MB body",
    "/ok": "204, as a receiver should",
}


@dataclasses.dataclass(frozen=True)
class Arrival:
    path: str
    webhook_id: str | None
    at: float


class HostileReceiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self.arrivals: list[Arrival] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def arrivals_to(self, path: str) -> list[Arrival]:
        with self._changed:
            return [a for a in self.arrivals if a.path == path]

    def wait_for(
        self, predicate: Callable[[list[Arrival]], bool], timeout: float = 30.0
    ) -> list[Arrival]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self.arrivals)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the expected calls did not come: {self.arrivals}")
                self._changed.wait(remaining)
            return list(self.arrivals)

    def start(self) -> HostileReceiver:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.settimeout(0.2)
        self._sock = sock
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> tuple[str, dict[str, str]] | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        return path, headers

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self._stop.wait(1.0):
                return
            conn.sendall(data[i : i + 1])

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(120)
        try:
            request = self._read_request(conn)
            if request is None:
                return
            path, headers = request
            with self._changed:
                self.arrivals.append(Arrival(path, headers.get("webhook-id"), time.monotonic()))
                self._changed.notify_all()
            self._misbehave(conn, path)
        except OSError:
            pass
        finally:
            conn.close()

    def _misbehave(self, conn: socket.socket, path: str) -> None:
        def answer(status: str, body: bytes, extra: str = "") -> bytes:
            return (
                f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{extra}"
                "connection: close\r\n\r\n"
            ).encode() + body

        if path == "/nul":
            conn.sendall(answer("200 OK", b"ok\x00still ok\x00"))
        elif path == "/invalid-utf8":
            conn.sendall(answer("200 OK", b"caf\xe9 \xff\xfe \xed\xa0\x80"))
        elif path == "/trickle":
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 600\r\n\r\n")
            self._trickle(conn, b"x" * 600)
        elif path == "/slow-headers":
            self._trickle(conn, answer("200 OK", b"late"))
        elif path == "/hang":
            self._stop.wait(120)
        elif path == "/redirect":
            conn.sendall(answer("302 Found", b"", "location: http://10.0.0.1/\r\n"))
        elif path == "/reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif path == "/garbage":
            conn.sendall(b"\x00\x01\x02 this is not HTTP \xff\r\n\r\n")
        elif path == "/huge":
            conn.sendall(answer("200 OK", b"y" * (5 * 1024 * 1024)))
        else:
            conn.sendall(answer("204 No Content", b""))
