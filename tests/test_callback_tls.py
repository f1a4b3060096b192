"""A callback to an https receiver goes to the checked address, yet names the
URL's host for SNI, the certificate check and ``Host`` (webhooks/sender.py).

The sender runs in a process of its own, as ``gateway dispatch`` does, so that
the trust store is the one the environment names (``SSL_CERT_FILE``), read
when the HTTP library is imported.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import Certs
from tests.helpers import child_env

SEND = """
import asyncio, json, sys
from webhooks.sender import callback_session, send_webhook
from webhooks.ssrf import parse_networks

async def main():
    async with callback_session(4) as session:
        result = await send_webhook(
            session,
            url=sys.argv[1],
            headers={"content-type": "application/json", "webhook-id": "msg_tls"},
            body='{"type": "run.completed"}',
            timeout_seconds=5,
            allowed=parse_networks(["127.0.0.1/32", "::1/128"]),
        )
    print(json.dumps(result.to_dict()))

asyncio.run(main())
"""


class TLSReceiver:
    """An https receiver on 127.0.0.1 that keeps the SNI name and the ``Host``
    header of each request, and answers 204."""

    def __init__(self, certs: Certs) -> None:
        self.names: list[str | None] = []
        self.hosts: list[str] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certs.cert, certs.key)
        self.context.sni_callback = lambda sock, name, ctx: self.names.append(name)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        # localhost is both addresses; the guard may pin either.
        first = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        )
        self.port = first.sockets[0].getsockname()[1]
        second = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "::1", self.port, ssl=self.context)
        )
        self._ready.set()
        self.loop.run_forever()
        for server in (first, second):
            server.close()
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            headers = dict(
                (name.strip().lower(), value.strip())
                for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
            )
            self.hosts.append(headers.get("host", ""))
            await reader.readexactly(int(headers.get("content-length", "0")))
            writer.write(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> TLSReceiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[TLSReceiver, Certs]]:
    certs = Certs(tmp_path)
    with TLSReceiver(certs) as tls:
        yield tls, certs


def _send(url: str, **env: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", SEND, url],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_an_https_callback_names_its_host_to_the_pinned_address(
    receiver: tuple[TLSReceiver, Certs],
) -> None:
    tls, certs = receiver
    result = _send(f"https://localhost:{tls.port}/hook", SSL_CERT_FILE=str(certs.ca))
    assert result["status_code"] == 204, result
    # localhost was resolved and checked, and 127.0.0.1 dialled; the TLS
    # handshake and the request still named localhost.
    assert tls.names == ["localhost"]
    assert tls.hosts == [f"localhost:{tls.port}"]


def test_an_https_callback_to_an_untrusted_certificate_fails_as_a_connection_error(
    receiver: tuple[TLSReceiver, Certs],
) -> None:
    tls, _ = receiver
    # Without the tests' CA in the trust store, the certificate is refused.
    result = _send(f"https://localhost:{tls.port}/hook", SSL_CERT_FILE="/nonexistent.pem")
    assert result["status_code"] is None
    assert result["error_code"] == "connection_error", result
    assert "certificate" in str(result["error"]).lower(), result
    assert tls.hosts == []  # no request was sent
