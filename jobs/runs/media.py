"""What tasks use to read images and to store what they make.

An image reference is one of: an http(s) URL (downloaded through the SSRF
guard, size-capped), a ``data:`` URI, bare base64, or an artifact of an
upstream task (``{"artifact_id": "art_…"}``, or that task's whole output).
Artifacts are stored by the gateway (the worker uploads them as a signed
call), so a worker needs no shared disk and never touches the database.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
from typing import Any

import httpx

from jobs.protocol import ARTIFACT_FETCH_PATH, ARTIFACTS_PATH
from jobs.report import GatewayUnreachable, Reporter, ReportRejected
from jobs.tasks.registry import TaskError
from webhooks.sender import guarded_stream
from webhooks.ssrf import AddressRefused, IPNetwork

__all__ = ["ImageData", "Media", "decode_data_uri"]


@dataclasses.dataclass(frozen=True)
class ImageData:
    data: bytes
    #: The content type the source declared, if it did.
    content_type: str | None


def decode_data_uri(value: str, *, max_bytes: int) -> ImageData:
    """The bytes of a ``data:`` URI or of bare base64."""
    content_type = None
    payload = value.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header:
            raise TaskError("invalid_image", "a data URI must be base64: data:<type>;base64,<data>")
        content_type = header[len("data:") :].split(";")[0] or None
    if len(payload) * 3 // 4 > max_bytes:
        raise TaskError("image_too_large", f"the image is over IMAGE_MAX_BYTES ({max_bytes})")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise TaskError("invalid_image", "the image is not valid base64") from None
    return ImageData(data, content_type)


class Media:
    """Image input and artifact output for one run."""

    def __init__(
        self,
        *,
        run_id: str,
        reporter: Reporter,
        http: httpx.AsyncClient,
        allowed: tuple[IPNetwork, ...],
        max_bytes: int,
        timeout: float = 30.0,
    ) -> None:
        self.run_id = run_id
        self.reporter = reporter
        self.http = http
        self.allowed = allowed
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def load(self, ref: Any) -> ImageData:
        """The bytes behind an image reference (see the module's docstring)."""
        if isinstance(ref, dict):
            artifact_id = ref.get("artifact_id")
            if isinstance(artifact_id, str):
                return await self.load_artifact(artifact_id)
            url = ref.get("url")
            if isinstance(url, str):
                return await self.load(url)
            raise TaskError("invalid_image", "an image object needs an artifact_id or a url")
        if not isinstance(ref, str) or not ref:
            raise TaskError("invalid_image", "an image must be a URL, a data URI or an artifact")
        if ref.startswith(("http://", "https://")):
            return await self.download(ref)
        return decode_data_uri(ref, max_bytes=self.max_bytes)

    async def download(self, url: str) -> ImageData:
        """GET ``url`` through the SSRF guard, all of it (connect, headers and
        body) within ``timeout`` seconds: a server that trickles bytes fails the
        download at the deadline instead of holding the run."""
        try:
            async with (
                asyncio.timeout(self.timeout),
                guarded_stream(
                    self.http, "GET", url, allowed=self.allowed, timeout_seconds=self.timeout
                ) as response,
            ):
                if response.status_code != 200:
                    raise TaskError(
                        "image_download_failed",
                        f"GET {url} answered {response.status_code}",
                        retryable=response.status_code >= 500 or response.status_code == 429,
                    )
                declared = response.headers.get("content-length")
                known = declared and declared.isascii() and declared.isdigit()
                if known and int(declared) > self.max_bytes:
                    raise TaskError(
                        "image_too_large",
                        f"the image is {declared} bytes; IMAGE_MAX_BYTES is {self.max_bytes}",
                    )
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise TaskError(
                            "image_too_large",
                            f"the image is over IMAGE_MAX_BYTES ({self.max_bytes})",
                        )
                content_type = response.headers.get("content-type", "").split(";")[0] or None
                return ImageData(bytes(data), content_type)
        except AddressRefused as exc:
            raise TaskError("image_url_not_allowed", exc.reason) from None
        except (TimeoutError, httpx.TimeoutException):
            raise TaskError(
                "image_download_failed",
                f"GET {url} did not finish within {self.timeout:g} s",
                retryable=True,
            ) from None
        except httpx.HTTPError as exc:
            raise TaskError(
                "image_download_failed", f"GET {url} failed: {exc}", retryable=True
            ) from None

    async def load_artifact(self, artifact_id: str) -> ImageData:
        try:
            response = await self.reporter.post(
                ARTIFACT_FETCH_PATH,
                artifact_id.encode(),
                "text/plain",
                params={"run_id": self.run_id},
            )
        except ReportRejected as exc:
            raise TaskError("artifact_not_found", f"artifact {artifact_id}: {exc}") from None
        except GatewayUnreachable as exc:
            raise TaskError(
                "gateway_unavailable", f"cannot fetch artifact {artifact_id}: {exc}", retryable=True
            ) from None
        return ImageData(response.content, response.headers.get("content-type"))

    async def store(
        self, data: bytes, content_type: str, *, width: int | None = None, height: int | None = None
    ) -> dict[str, Any]:
        """Store ``data`` as an artifact of this run; returns its ID, signed URL and digest."""
        params = {"run_id": self.run_id, "content_type": content_type}
        if width is not None and height is not None:
            params.update(width=str(width), height=str(height))
        try:
            response = await self.reporter.post(ARTIFACTS_PATH, data, content_type, params)
        except ReportRejected as exc:
            raise TaskError("artifact_rejected", str(exc)) from None
        except GatewayUnreachable as exc:
            raise TaskError(
                "gateway_unavailable", f"cannot store the artifact: {exc}", retryable=True
            ) from None
        stored: dict[str, Any] = response.json()
        return stored
