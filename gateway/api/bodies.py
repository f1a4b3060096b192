"""Reading request bodies: size-capped, JSON, and validated into a model."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import (
    InvalidJSON,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
    error_response,
    validation_details,
)
from gateway.settings import Settings
from jobs.protocol import SIGNATURE_HEADER, JSONRefused, SignatureError, loads, verify_request

__all__ = [
    "RefuseNul",
    "json_dict",
    "json_object",
    "parse_json",
    "read_body",
    "require_json",
    "signed_body",
    "validate",
]

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes``."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"the body is over the limit of {max_bytes} bytes")
    return bytes(body)


#: JSON nested deeper than this is refused (Python's parser would hit its
#: recursion limit around 1,000 levels; no real payload needs 64).
MAX_JSON_DEPTH = 64


#: A JSON string, escapes and all (the loop unrolled: twice as fast as an
#: alternation per character in ``re``).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_PARENS = bytes.maketrans(b"[{]}", b"(())")


def _depth_ok(body: bytes) -> bool:
    """Brackets outside strings never nest past MAX_JSON_DEPTH.

    Exact for JSON; a body that is not JSON may pass, and its parse refuses
    it. The worker's reports hold hundreds of objects, so the brackets are
    read by C-speed passes, not a Python loop: the strings cut out (split at
    their quotes when no escape can hide one), then each pass removes the
    innermost pairs; a pair still there after MAX_JSON_DEPTH passes nests
    deeper.
    """
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return True  # the common case costs two C-speed counts
    if b"\\" in body:
        outside = _STRING.sub(b"", body)
    else:  # every quote opens or closes a string
        outside = b"".join(body.split(b'"')[::2])
    nests = outside.translate(_PARENS, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        shallower = nests.replace(b"()", b"")
        if len(shallower) == len(nests):
            return True  # what is left pairs nothing: not JSON, its parse says so
        nests = shallower
    return b"()" not in nests


def parse_json(body: bytes) -> Any:
    """The body's JSON, if both databases can store it (``jobs.protocol.loads``):
    400 ``invalid_json`` for what is not JSON (``NaN``, ``1e999``), 422
    ``unsupported_character`` for a NUL or a lone surrogate, naming where."""
    if not _depth_ok(body):
        raise InvalidJSON(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return loads(body)
    except JSONRefused as exc:
        if exc.not_json:
            raise InvalidJSON(f"the request body is not valid JSON: {exc.reason}") from None
        raise ValidationFailed(
            f"the request holds text that cannot be stored: {exc.reason}",
            code="unsupported_character",
            details=[{"path": exc.path, "type": "unsupported_character", "message": exc.reason}],
        ) from None
    except UnicodeDecodeError:
        raise InvalidJSON("the request body is not UTF-8 text") from None
    except RecursionError:
        raise InvalidJSON("the request body nests too deep") from None
    except ValueError as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from None


def validate(model: type[M], data: Any, *, prefix: tuple[str, ...] = ()) -> M:
    """``data`` as ``model``, or a 422 listing each field path at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(details=validation_details(exc, prefix)) from None


def require_json(request: Request) -> None:
    """415 for a body declared as anything but JSON (``text/plain``, a form):
    what the client meant by it is not known, so it is not guessed.
    ``application/json``, ``application/*+json`` and no content-type pass."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise UnsupportedMediaType(
        f"the body is declared as {media or 'nothing'!r}; send it as JSON with "
        "content-type: application/json (curl: --json)"
    )


async def json_dict(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; an empty body counts as ``{}``.

    :raises UnsupportedMediaType: a body declared as something else than JSON
    """
    raw = await read_body(request, max_bytes)
    if raw.strip():
        require_json(request)
    data = parse_json(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise ValidationFailed(
            "the request body must be a JSON object",
            details=[{"path": "", "message": "expected an object", "type": "dict_type"}],
        )
    return data


async def json_object(request: Request, max_bytes: int, model: type[M]) -> M:
    """The body as ``model``; an empty body counts as ``{}``.

    :raises UnsupportedMediaType: a body declared as something else than JSON
    """
    return validate(model, await json_dict(request, max_bytes))


def _route_path(request: Request) -> str:
    """The request's path on this app, without a proxy's ``root_path``: what
    the worker signed (it signs the internal path, not its own URL's prefix)."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def signed_body(request: Request, settings: Settings, max_bytes: int) -> bytes:
    """The body of a worker's call, once its signature checks out for this very
    request: method, path, query string and body (else 401)."""
    body = await read_body(request, max_bytes)
    try:
        verify_request(
            settings.secret_keys(),
            request.headers.get(SIGNATURE_HEADER),
            request.method,
            _route_path(request),
            request.scope.get("query_string", b"").decode("latin-1"),
            body,
            max_age=settings.event_max_age,
        )
    except SignatureError as exc:
        raise Unauthorized(exc.message, code=exc.code) from None
    return body


class RefuseNul:
    """ASGI middleware: a NUL character (``%00``) in the path or the query
    string is a 400 before any route sees it. No ID, filter or cursor holds
    one, and PostgreSQL refuses it in every text parameter."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query: bytes = scope.get("query_string", b"")
            if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
                response = error_response(
                    400, "bad_request", "a NUL character (%00) is not allowed in a URL"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
