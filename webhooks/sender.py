"""Outbound HTTP to addresses we do not control: callbacks and image downloads.

Everything passes the same guard (``_guard``): the URL in its normal form
(IDNA host), the SSRF check, the checked address pinned, no redirects
followed. Image downloads stream through httpx (:func:`guarded_stream`);
callbacks, the hot path, go through one aiohttp pool (:func:`send_webhook`).
A callback attempt has one deadline for all of it (resolve, connect, send,
headers and body), so a receiver that trickles its answer byte by byte holds
a slot for ``WEBHOOK_TIMEOUT`` at most, and every attempt ends as an
:class:`AttemptResult`, whatever went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import functools
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import httpx

from webhooks.ssrf import AddressRefused, IPNetwork, resolve_checked, validate_url

__all__ = [
    "ATTEMPT_ERROR_CODES",
    "AttemptResult",
    "callback_session",
    "guarded_stream",
    "parse_retry_after",
    "send_webhook",
]

log = logging.getLogger("webhooks.sender")

EXCERPT_BYTES = 2048

#: Why an attempt got no answer: ``error_code`` of an :class:`AttemptResult`.
ATTEMPT_ERROR_CODES = (
    "timeout",  # no answer (or no headers) within the attempt's deadline
    "connection_error",  # refused, reset, TLS failure, a broken answer
    "address_refused",  # the SSRF guard: a private address, an unresolvable or invalid host
    "send_failed",  # anything else that went wrong on our side while sending
)


def excerpt_text(data: bytes) -> str:
    """The first bytes of an answer as text every database stores: invalid
    UTF-8 and NUL become U+FFFD."""
    return data[:EXCERPT_BYTES].decode("utf-8", errors="replace").replace("\x00", "\ufffd")


@dataclasses.dataclass(frozen=True)
class AttemptResult:
    """What came of one attempt: an answer, or the error that kept it from coming."""

    status_code: int | None
    latency_ms: int
    response_body: str | None
    error: str | None
    retry_after: float | None
    #: One of :data:`ATTEMPT_ERROR_CODES` when there was no answer.
    error_code: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _pinned_url(url: str, address: str) -> str:
    """``url`` with its host replaced by the checked address (same port and path)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


@dataclasses.dataclass(frozen=True)
class _Guarded:
    """A URL past the SSRF guard: where to connect, and what to tell the host."""

    url: str  # the checked address pinned in place of the host
    host: str  # the ``Host`` header: the URL's own
    sni: str | None  # for https, the name for SNI and the certificate check


@functools.lru_cache(maxsize=4096)
def _valid_url(url: str, allowed: tuple[IPNetwork, ...]) -> str:
    """``validate_url``, kept: it reads no DNS, so its answer for a URL never
    changes, and a dispatcher sends to the same few URLs again and again (it
    was 5% of the dispatcher's CPU, docs/performance.md). A refusal is not
    kept: it is raised again each time."""
    return validate_url(url, allowed)


async def _guard(url: str, allowed: Sequence[IPNetwork]) -> _Guarded:
    """``url`` in its normal form, its host resolved and checked (``webhooks.ssrf``).

    :raises AddressRefused: the URL or an address it resolves to is refused
    """
    url = _valid_url(url, tuple(allowed))
    parts = urlsplit(url)
    hostname = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = await resolve_checked(hostname, port, allowed)
    return _Guarded(
        url=_pinned_url(url, str(address)),
        host=parts.netloc.rpartition("@")[2],
        sni=hostname if parts.scheme == "https" else None,
    )


@contextlib.asynccontextmanager
async def guarded_stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    allowed: Sequence[IPNetwork],
    timeout_seconds: float,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
) -> AsyncIterator[httpx.Response]:
    """Stream ``method url`` through the SSRF guard, never following redirects.

    The host is resolved here and checked (see ``webhooks.ssrf``); the request
    goes to the checked address, with the URL's own ``Host`` header and, for
    https, its name for SNI and certificate checks.

    :raises AddressRefused: the URL or an address it resolves to is refused
    :raises httpx.HTTPError: the request failed or timed out
    """
    target = await _guard(url, allowed)
    request_headers = dict(headers or {})
    request_headers["host"] = target.host
    async with client.stream(
        method,
        target.url,
        content=content,
        headers=request_headers,
        timeout=timeout_seconds,
        extensions={"sni_hostname": target.sni} if target.sni else {},
        follow_redirects=False,
    ) as response:
        yield response


def callback_session(connections: int) -> aiohttp.ClientSession:
    """The pool callbacks leave through: at most ``connections`` open at once
    (all receivers together), no proxies from the environment, no cookies kept
    between receivers, and the answer's body as it comes (only an excerpt is
    read). Callbacks go through aiohttp rather than httpx: its C parser and
    plain pool cost a tenth of the CPU per request (docs/performance.md)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        skip_auto_headers=("user-agent",),
    )


async def send_webhook(
    session: aiohttp.ClientSession,
    *,
    url: str,
    headers: Mapping[str, str],
    body: str,
    timeout_seconds: float,
    allowed: Sequence[IPNetwork],
) -> AttemptResult:
    """POST ``body`` to ``url`` through the SSRF guard (the checked address
    pinned, the URL's own ``Host`` and SNI name, no redirects followed), all
    of it within ``timeout_seconds``; never raises (but for cancellation).

    Once the headers are in, the answer counts: a body still arriving at the
    deadline is cut there and the status code stands.
    """
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds

    def elapsed() -> int:
        return round((time.perf_counter() - start) * 1000)

    def failed(code: str, error: str) -> AttemptResult:
        return AttemptResult(None, elapsed(), None, error, None, code)

    timed_out = f"timed out after {timeout_seconds:g} s"
    response: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout_at(deadline):  # resolve, connect, send, headers
            target = await _guard(url, allowed)
            response = await session.post(
                target.url,
                data=body.encode(),
                headers={**headers, "host": target.host},
                allow_redirects=False,
                server_hostname=target.sni,
                timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            )
        excerpt = bytearray()
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout_at(deadline):  # as much body as comes in time
                while len(excerpt) < EXCERPT_BYTES:
                    chunk = await response.content.read(EXCERPT_BYTES - len(excerpt))
                    if not chunk:
                        break
                    excerpt += chunk
        return AttemptResult(
            response.status,
            elapsed(),
            excerpt_text(bytes(excerpt)),
            None,
            parse_retry_after(response.headers.get("retry-after")),
        )
    except AddressRefused as exc:
        return failed("address_refused", f"refused: {exc.reason}")
    except TimeoutError:
        return failed("timeout", timed_out)
    except aiohttp.ClientError as exc:
        return failed("connection_error", f"connection error: {_reason(exc)}")
    except Exception as exc:  # a bug or a library's surprise must not lose the attempt
        log.exception("sending to %s failed unexpectedly", url)
        return failed("send_failed", f"the attempt failed: {type(exc).__name__}: {exc}")
    finally:
        # A body not read to its end leaves the connection unusable: it is
        # closed, never handed to the next attempt (nor is one still trickling).
        if response is not None:
            if response.content.is_eof():
                response.release()
            else:
                response.close()


def _reason(exc: aiohttp.ClientError) -> str:
    """What went wrong, in words, for the attempt log."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return str(exc.os_error) or type(exc.os_error).__name__
    return str(exc) or type(exc).__name__
