"""Who is looking at the dashboard: an API key, remembered in a signed cookie.

Signing in with an API key starts a session in the database
(``dashboard_sessions``) and puts its random ID in Starlette's session cookie
(signed with itsdangerous, HttpOnly, SameSite=Strict, scoped to
``/dashboard``); never the key itself. Each request checks the session is
still open and its key not revoked: signing out ends the session on the
server, so a copy of the cookie is worth nothing afterwards, and revoking a
key signs its sessions out. Every form that changes something carries the
session's CSRF token.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import secrets
import urllib.parse
from typing import Any

import itsdangerous
import sqlalchemy as sa
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp

from db.models import ApiKey, DashboardSession, Project
from db.types import utcnow
from gateway.api.bodies import read_body
from gateway.auth.keys import is_active
from gateway.errors import APIError
from gateway.services import services_of
from gateway.settings import Settings

__all__ = [
    "PREFIX",
    "CsrfFailed",
    "SignInRequired",
    "Viewer",
    "csrf_token",
    "read_form",
    "session_middleware",
    "sign_in",
    "sign_out",
    "viewer_of",
]

#: Where the dashboard lives; the session cookie is sent to this path only.
PREFIX = "/dashboard"
SESSION_COOKIE = "gateway_dashboard"
#: The largest form the dashboard accepts (its forms hold a few short fields).
MAX_FORM_BYTES = 16 * 1024

api_keys = ApiKey.__table__  # type: ignore[attr-defined]
projects = Project.__table__  # type: ignore[attr-defined]
sessions = DashboardSession.__table__  # type: ignore[attr-defined]


class SignInRequired(APIError):
    status_code, code, message = 401, "sign_in_required", "sign in with an API key first"


class CsrfFailed(APIError):
    status_code, code = 403, "csrf_failed"
    message = "the form is stale or did not come from this dashboard; reload the page and retry"


@dataclasses.dataclass(frozen=True)
class Viewer:
    """The signed-in project, as one request sees it."""

    project_id: str
    project_name: str
    key_id: str
    key_prefix: str


class _RotatingSessions(SessionMiddleware):
    """Starlette's session cookie, checked against every key the gateway's
    secret has had (``GATEWAY_PREVIOUS_SECRET_KEYS``) and signed with the
    current one, so a key rotation signs nobody out."""

    def __init__(
        self,
        app: ASGIApp,
        secret_keys: list[str],
        session_cookie: str,
        max_age: int,
        path: str,
        https_only: bool,
    ) -> None:
        super().__init__(
            app,
            secret_key=secret_keys[-1],
            session_cookie=session_cookie,
            max_age=max_age,
            path=path,
            same_site="strict",
            https_only=https_only,
        )
        self.signer = itsdangerous.TimestampSigner(secret_keys)


def session_middleware(settings: Settings) -> Middleware:
    # A key of its own, derived from the gateway's secret, so a session
    # cookie can never pass for any other signed value.
    keys = [
        hmac.new(key.encode(), b"gateway.dashboard.session", hashlib.sha256).hexdigest()
        for key in settings.secret_keys()
    ]
    return Middleware(
        _RotatingSessions,
        secret_keys=keys,
        session_cookie=SESSION_COOKIE,
        max_age=settings.dashboard_session_max_age,
        path=PREFIX,
        https_only=settings.public_url.startswith("https://"),
    )


def _session_key(session_id: str) -> str:
    # Only a digest is stored: the database alone opens no session.
    return hashlib.sha256(session_id.encode()).hexdigest()


def _viewer_row(conn: sa.Connection, session_key: str) -> sa.Row[Any] | None:
    return conn.execute(
        sa.select(
            api_keys.c.id, api_keys.c.prefix, projects.c.id.label("project_id"), projects.c.name
        )
        .select_from(
            sessions.join(api_keys, api_keys.c.id == sessions.c.key_id).join(
                projects, projects.c.id == api_keys.c.project_id
            )
        )
        .where(
            sessions.c.id == session_key,
            sessions.c.ended_at.is_(None),
            sessions.c.expires_at > utcnow(),
            is_active(),
        )
    ).first()


async def viewer_of(request: Request) -> Viewer:
    """The signed-in viewer, or :class:`SignInRequired`."""
    session_id = request.session.get("sid")
    if not isinstance(session_id, str):
        raise SignInRequired()
    row = await services_of(request).db.read(_viewer_row, _session_key(session_id))
    if row is None:  # signed out, expired, or its key was revoked
        request.session.clear()
        raise SignInRequired("this session has ended; sign in again")
    return Viewer(
        project_id=row.project_id, project_name=row.name, key_id=row.id, key_prefix=row.prefix
    )


async def sign_in(request: Request, key: str) -> None:
    """Start a session for the project of ``key`` (an :class:`Unauthorized` if it is not one)."""
    services = services_of(request)
    principal = await services.auth.resolve(key.strip())
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    row = {
        "id": _session_key(session_id),
        "key_id": principal.key_id,
        "created_at": now,
        "expires_at": now + dt.timedelta(seconds=services.settings.dashboard_session_max_age),
    }
    await services.db.write(lambda conn: conn.execute(sessions.insert(), row))
    request.session.clear()
    request.session.update(sid=session_id, csrf=secrets.token_urlsafe(32))


async def sign_out(request: Request) -> None:
    """End the session here and on the server."""
    session_id = request.session.get("sid")
    request.session.clear()
    if isinstance(session_id, str):
        key = _session_key(session_id)
        await services_of(request).db.write(
            lambda conn: conn.execute(
                sessions.update()
                .where(sessions.c.id == key, sessions.c.ended_at.is_(None))
                .values(ended_at=utcnow())
            )
        )


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use, so the sign-in form has one too)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


async def read_form(request: Request, max_bytes: int = MAX_FORM_BYTES) -> dict[str, str]:
    """The posted form's fields, once its CSRF token matches the session's."""
    body = await read_body(request, max_bytes)
    fields = {
        name: values[-1]
        for name, values in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()
    }
    sent = fields.pop("csrf_token", None) or request.headers.get("x-csrf-token", "")
    expected = request.session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfFailed()
    return fields
