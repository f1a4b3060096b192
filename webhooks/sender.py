"""Outbound HTTP to addresses we do not control: callbacks and image downloads.

Everything goes through :func:`guarded_stream`: the SSRF guard, the checked
address pinned, no redirects followed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from webhooks.ssrf import AddressRefused, IPNetwork, resolve_checked, validate_url

__all__ = ["AttemptResult", "guarded_stream", "parse_retry_after", "send_webhook"]

EXCERPT_BYTES = 2048


@dataclasses.dataclass(frozen=True)
class AttemptResult:
    """What came of one attempt: an answer, or the error that kept it from coming."""

    status_code: int | None
    latency_ms: int
    response_body: str | None
    error: str | None
    retry_after: float | None

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
    validate_url(url, allowed)
    parts = urlsplit(url)
    hostname = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = await resolve_checked(hostname, port, allowed)
    request_headers = dict(headers or {})
    request_headers["host"] = parts.netloc.rpartition("@")[2]
    extensions = {"sni_hostname": hostname} if parts.scheme == "https" else {}
    async with client.stream(
        method,
        _pinned_url(url, str(address)),
        content=content,
        headers=request_headers,
        timeout=timeout_seconds,
        extensions=extensions,
        follow_redirects=False,
    ) as response:
        yield response


async def send_webhook(
    client: httpx.AsyncClient,
    *,
    url: str,
    headers: Mapping[str, str],
    body: str,
    timeout_seconds: float,
    allowed: Sequence[IPNetwork],
) -> AttemptResult:
    """POST ``body`` to ``url`` through :func:`guarded_stream`; never raises
    for the receiver's faults."""
    start = time.perf_counter()

    def elapsed() -> int:
        return round((time.perf_counter() - start) * 1000)

    try:
        async with guarded_stream(
            client,
            "POST",
            url,
            allowed=allowed,
            timeout_seconds=timeout_seconds,
            headers=headers,
            content=body.encode(),
        ) as response:
            excerpt = bytearray()
            async for chunk in response.aiter_bytes():
                excerpt += chunk
                if len(excerpt) >= EXCERPT_BYTES:
                    break
            text = bytes(excerpt[:EXCERPT_BYTES]).decode("utf-8", errors="replace")
            return AttemptResult(
                response.status_code,
                elapsed(),
                text,
                None,
                parse_retry_after(response.headers.get("retry-after")),
            )
    except AddressRefused as exc:
        return AttemptResult(None, elapsed(), None, f"refused: {exc.reason}", None)
    except httpx.TimeoutException:
        return AttemptResult(None, elapsed(), None, f"timed out after {timeout_seconds:g} s", None)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        return AttemptResult(None, elapsed(), None, f"connection error: {reason}", None)
