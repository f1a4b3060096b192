"""Routes of the public API: each carries its operation, and its auth mode guards it.

One table: an :class:`ApiRoute` holds the handler, the method and path, and the
:class:`Operation` that documents it. The OpenAPI document is built by walking
``app.routes`` (``gateway.api.openapi``), and the route applies the
operation's auth mode itself before the handler runs, so what is documented is
what is enforced:

- ``key``: ``Authorization: Bearer <API key>``; the handler gets the project's ID
- ``key_or_token``: the key, or a run's public access token for the run in the
  path; the handler gets the project's ID, or ``None`` for a token
- ``link``: a signed link in the path (the handler checks it)
- ``none``: open (health checks, this document)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth.tokens import PublicTokens
from gateway.errors import BadRequest, ValidationFailed
from gateway.runs.errors import RunNotFound
from gateway.services import services_of

__all__ = [
    "PAGE",
    "PAGE_SIZE",
    "ApiRoute",
    "Auth",
    "Operation",
    "Param",
    "id_cursor",
    "invalid_cursor",
    "page_limit",
    "recheck",
    "run_reader",
]

Auth = Literal["key", "key_or_token", "none", "link"]
Handler = Callable[..., Awaitable[Response]]


@dataclasses.dataclass(frozen=True)
class Param:
    """A path, query or header parameter, for the document."""

    name: str
    where: Literal["path", "query", "header"]
    description: str
    schema: dict[str, Any] = dataclasses.field(default_factory=lambda: {"type": "string"})
    required: bool = False


#: The page size of every list when ``limit`` is absent.
PAGE_SIZE = 50

#: The parameters of every paged list.
PAGE = (
    Param("limit", "query", f"1 to 100 ({PAGE_SIZE})", {"type": "integer"}),
    Param("cursor", "query", "next_cursor of the previous page"),
)


@dataclasses.dataclass(frozen=True)
class Operation:
    """What an API route does, answers and needs.

    :param answers: status → the model of its body (or a description)
    :param body: the request body's model
    :param errors: error statuses besides 401 and 429, which every
        authenticated operation may give
    """

    summary: str
    tag: str
    answers: dict[int, type[BaseModel] | str]
    body: type[BaseModel] | None = None
    auth: Auth = "key"
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()


def limit_problem(request: Request, most: int = 100) -> dict[str, str] | None:
    """What is wrong with the ``limit`` query parameter (1 to ``most``), as a
    validation detail, or ``None``."""
    raw = request.query_params.get("limit", str(PAGE_SIZE))
    if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= most:
        return None
    return {
        "path": "query.limit",
        "message": f"a whole number from 1 to {most}; got {raw[:40]!r}",
        "type": "value_error",
    }


def page_limit(request: Request, most: int = 100) -> int:
    """The ``limit`` query parameter of every list: 1 to ``most``,
    :data:`PAGE_SIZE` when absent, else a 422 naming it."""
    problem = limit_problem(request, most)
    if problem is not None:
        raise ValidationFailed(f"limit must be a whole number from 1 to {most}", details=[problem])
    return int(request.query_params.get("limit", str(PAGE_SIZE)))


_ID_BODY = re.compile(r"^[0-9a-hjkmnp-tv-z]{26}$")


def id_cursor(request: Request, prefix: str) -> str | None:
    """The ``cursor`` query parameter: a page's ``next_cursor`` (an ID with
    ``prefix``), or ``None``. Anything else is a 400 ``invalid_cursor``:
    read as "from the start", it would page through the wrong rows."""
    raw = request.query_params.get("cursor") or None
    if raw is None:
        return None
    head, _, body = raw.partition("_")
    if head != prefix or not _ID_BODY.match(body):
        raise invalid_cursor(raw)
    return raw


def invalid_cursor(raw: str) -> BadRequest:
    return BadRequest(
        "cursor is not a next_cursor this list gave",
        code="invalid_cursor",
        details=[
            {"path": "query.cursor", "type": "invalid_cursor", "message": f"got {raw[:80]!r}"}
        ],
    )


def _token(request: Request) -> str | None:
    """A public access token the request carries (query or bearer), if any."""
    token = request.query_params.get("token")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if not token and scheme.lower() == "bearer" and PublicTokens.looks_like(value.strip()):
        token = value.strip()
    return token or None


async def run_reader(request: Request) -> str | None:
    """Who may read the run in the path: the project of an API key, or
    ``None`` for a public access token made for exactly this run."""
    services = services_of(request)
    run_id = request.path_params["run_id"]
    token = _token(request)
    if token:
        if services.tokens.run_of(token) != run_id:
            raise RunNotFound(run_id)
        return None
    return (await services.auth.authenticate(request)).project_id


async def recheck(request: Request) -> None:
    """Check the request's credential again, for a stream that outlives its
    start: a key revoked since (seen within the key cache's lifetime) or a
    token expired since raises its :class:`Unauthorized`."""
    services = services_of(request)
    token = _token(request)
    if token:
        services.tokens.run_of(token)
        return
    _, _, key = request.headers.get("authorization", "").partition(" ")
    await services.auth.resolve(key.strip())


def _guarded(handler: Handler, auth: Auth) -> Handler:
    if auth == "key":

        async def with_key(request: Request) -> Response:
            services = services_of(request)
            await services.schema.require()
            principal = await services.auth.authenticate(request)
            return await handler(request, principal.project_id)

        endpoint = with_key
    elif auth == "key_or_token":

        async def with_key_or_token(request: Request) -> Response:
            await services_of(request).schema.require()
            return await handler(request, await run_reader(request))

        endpoint = with_key_or_token
    else:
        return handler
    endpoint.__name__ = endpoint.__qualname__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


class ApiRoute(Route):
    """A route of the public API: ``method path`` → ``handler``, documented by
    ``operation`` and guarded by its auth mode."""

    def __init__(self, method: str, path: str, handler: Handler, operation: Operation) -> None:
        self.operation = operation
        self.handler = handler
        super().__init__(path, _guarded(handler, operation.auth), methods=[method])

    @property
    def method(self) -> str:
        return next(m for m in self.methods or () if m != "HEAD")
