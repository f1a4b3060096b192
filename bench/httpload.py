"""A lean HTTP/1.1 load client for the benchmarks.

httpx spends about a millisecond of CPU per request, which on two cores caps
what it can measure well below what the gateway serves. This client keeps
``connections`` keep-alive sockets, writes prebuilt requests and reads answers
by ``Content-Length``: enough for our own JSON API, and cheap.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Answer", "Connection", "LoadResult", "request_bytes", "run_load"]


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class LoadResult:
    answers: list[Answer] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.answers) / self.elapsed if self.elapsed else 0.0


def request_bytes(
    method: str, path: str, *, host: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return Answer(status, body)


class Connection:
    """One keep-alive connection, one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        self.writer.close()
        await self.writer.wait_closed()

    async def request(self, data: bytes) -> Answer:
        assert self.reader is not None and self.writer is not None
        self.writer.write(data)
        return await _read_answer(self.reader)


async def run_load(
    host: str,
    port: int,
    requests: list[bytes],
    *,
    connections: int,
    on_answer: Callable[[int, Answer], None] | None = None,
) -> LoadResult:
    """Send every request over ``connections`` keep-alive connections."""
    result = LoadResult(answers=[Answer(0, b"")] * len(requests), latencies=[0.0] * len(requests))
    next_index = 0

    async def connection() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while next_index < len(requests):
                index = next_index
                next_index += 1
                start = time.perf_counter()
                writer.write(requests[index])
                answer = await _read_answer(reader)
                result.latencies[index] = time.perf_counter() - start
                result.answers[index] = answer
                if on_answer is not None:
                    on_answer(index, answer)
        finally:
            writer.close()
            await writer.wait_closed()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(min(connections, len(requests)))))
    result.elapsed = time.perf_counter() - start
    return result
