"""Errors the API answers with, and the handlers that turn them into JSON.

    APIError (500 internal_error)
     ├── BadRequest (400 bad_request)
     │    └── InvalidJSON (400 invalid_json)
     ├── Unauthorized (401 unauthorized)
     ├── NotFound (404 not_found)
     ├── Conflict (409 conflict)
     ├── PayloadTooLarge (413 payload_too_large)
     ├── ValidationFailed (422 validation_error)
     │    └── InvalidEvent (422 invalid_event)
     ├── RateLimited (429 rate_limited)
     └── ServiceUnavailable (503 service_unavailable)

Every answer has the shape ``{"error": {"code", "message", "details"}}``;
``code`` is the subclass's default unless a raiser names a finer one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = [
    "APIError",
    "BadRequest",
    "Conflict",
    "InvalidEvent",
    "InvalidJSON",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServiceUnavailable",
    "Unauthorized",
    "UnsupportedMediaType",
    "ValidationFailed",
    "error_response",
    "exception_handlers",
    "validation_details",
]

log = logging.getLogger("gateway.errors")


class APIError(Exception):
    """An error answer. Subclasses set ``status_code``, ``code`` and ``message``.

    :param message: overrides the class's message
    :param code: a finer code than the class's (``run_not_found``)
    :param details: a list of objects saying more (field paths, for example)
    :param headers: extra response headers (``Retry-After``, ...)
    """

    status_code = 500
    code = "internal_error"
    message = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        details: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        self.details = [dict(d) for d in details]
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The error as the API answers it: ``{"error": {code, message, details}}``."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(APIError):
    status_code, code, message = 400, "bad_request", "bad request"


class InvalidJSON(BadRequest):
    code, message = "invalid_json", "the request body is not valid JSON"


class Unauthorized(APIError):
    status_code, code, message = 401, "unauthorized", "a valid API key is required"


class NotFound(APIError):
    status_code, code, message = 404, "not_found", "not found"


class Conflict(APIError):
    status_code, code, message = 409, "conflict", "conflict"


class PayloadTooLarge(APIError):
    status_code, code, message = 413, "payload_too_large", "the request body is too large"


class UnsupportedMediaType(APIError):
    status_code, code = 415, "unsupported_media_type"
    message = "send the body as JSON, with content-type: application/json"


class ValidationFailed(APIError):
    status_code, code, message = 422, "validation_error", "the request does not fit the schema"


class InvalidEvent(ValidationFailed):
    """A worker event that is signed but makes no sense for its run."""

    code, message = "invalid_event", "the event does not fit the run it names"


class RateLimited(APIError):
    status_code, code, message = 429, "rate_limited", "too many requests"


class ServiceUnavailable(APIError):
    status_code, code, message = 503, "service_unavailable", "try again shortly"


def validation_details(
    exc: ValidationError, prefix: Sequence[str | int] = ()
) -> list[dict[str, Any]]:
    """Pydantic's errors as ``{"path", "message", "type"}`` with dotted paths."""
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        path = [*prefix, *err["loc"]]
        details.append(
            {
                "path": ".".join(str(p) for p in path),
                "message": err["msg"],
                "type": err["type"],
            }
        )
    return details


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": list(details)}},
        status_code=status_code,
        headers=dict(headers or {}),
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    """The database did not answer: nothing was written, so the client may retry."""
    log.warning(
        "database unavailable on %s %s: %s",
        request.method,
        request.url.path,
        str(exc).splitlines()[0][:300],
    )
    return error_response(
        503,
        "database_unavailable",
        "the database does not answer; nothing was changed, try again shortly",
        headers={"retry-after": "2"},
    )


async def _unstorable(request: Request, exc: Exception) -> Response:
    """The database refused a value that validation let through: the request
    is at fault (422), and its transaction was rolled back whole. Logged, as
    it means a check is missing."""
    log.warning(
        "the database refused a value on %s %s: %s",
        request.method,
        request.url.path,
        str(exc).splitlines()[0][:300],
    )
    return error_response(
        422,
        "unstorable_value",
        "the database cannot store a value of this request; nothing changed",
    )


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error; the gateway logged it")


exception_handlers: dict[Any, Any] = {
    APIError: _api_error,
    HTTPException: _http_error,
    # A lost or refused connection (a restarting PostgreSQL, a locked-out SQLite).
    OperationalError: _database_unavailable,
    InterfaceError: _database_unavailable,
    SATimeoutError: _database_unavailable,
    ConnectionError: _database_unavailable,
    DataError: _unstorable,
    Exception: _unhandled,
}
