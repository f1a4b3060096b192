"""Reading request bodies: size-capped, JSON, and validated into a model."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.errors import (
    InvalidJSON,
    PayloadTooLarge,
    Unauthorized,
    ValidationFailed,
    validation_details,
)
from gateway.settings import Settings
from webhooks.signing import EVENT_SIGNATURE_HEADER, EventSignatureError, verify_event_body

__all__ = ["json_object", "parse_json", "read_body", "signed_body", "validate"]

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


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _depth_ok(body: bytes) -> bool:
    """Brackets outside strings never nest past MAX_JSON_DEPTH."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return True  # the common case costs two C-speed counts
    depth = 0
    for byte in _STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if byte in (0x5B, 0x7B) else -1
        if depth > MAX_JSON_DEPTH:
            return False
    return True


def parse_json(body: bytes) -> Any:
    if not _depth_ok(body):
        raise InvalidJSON(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body)
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


async def json_object(request: Request, max_bytes: int, model: type[M]) -> M:
    """The body as ``model``; an empty body counts as ``{}``."""
    raw = await read_body(request, max_bytes)
    data = parse_json(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise ValidationFailed(
            "the request body must be a JSON object",
            details=[{"path": "", "message": "expected an object", "type": "dict_type"}],
        )
    return validate(model, data)


async def signed_body(request: Request, settings: Settings, max_bytes: int) -> bytes:
    """The body of a worker's call, once its signature checks out (else 401)."""
    body = await read_body(request, max_bytes)
    try:
        verify_event_body(
            body,
            request.headers.get(EVENT_SIGNATURE_HEADER),
            settings.secret_key,
            max_age=settings.event_max_age,
        )
    except EventSignatureError as exc:
        raise Unauthorized(exc.message, code=exc.code) from None
    return body
