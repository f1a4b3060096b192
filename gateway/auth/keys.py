"""Projects and their secret API keys.

A key is ``gw_sk_`` and 43 URL-safe characters (256 random bits). Only its
SHA-256 is stored: a leaked database leaks no usable key. A fast hash is the
right one here, as the key is random, not a password.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import hashlib
import secrets
import time
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request

from db.engine import Database
from db.ids import new_id
from db.models import ApiKey, DashboardSession, Project
from db.types import utcnow
from gateway.auth.ratelimit import RateLimiter
from gateway.errors import Unauthorized

__all__ = [
    "KEY_PREFIX",
    "ApiKeyAuth",
    "KeyNotFound",
    "Principal",
    "create_api_key",
    "hash_api_key",
    "is_active",
    "list_api_keys",
    "revoke_api_key",
    "rotate_api_key",
]

KEY_PREFIX = "gw_sk_"

projects = Project.__table__  # type: ignore[attr-defined]
api_keys = ApiKey.__table__  # type: ignore[attr-defined]
sessions = DashboardSession.__table__  # type: ignore[attr-defined]


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _create_api_key(
    conn: sa.Connection,
    project_name: str,
    key: str,
    rate_limit: float | None = None,
    rate_burst: int | None = None,
) -> str:
    project_id = conn.scalar(sa.select(projects.c.id).where(projects.c.name == project_name))
    if project_id is None:
        project_id = new_id("proj")
        conn.execute(
            projects.insert(), {"id": project_id, "name": project_name, "created_at": utcnow()}
        )
    conn.execute(
        api_keys.insert(),
        {
            "id": new_id("key"),
            "project_id": project_id,
            "key_hash": hash_api_key(key),
            "prefix": key[: len(KEY_PREFIX) + 6],
            "created_at": utcnow(),
            "rate_limit": rate_limit,
            "rate_burst": rate_burst,
        },
    )
    return str(project_id)


async def create_api_key(
    db: Database,
    project_name: str,
    *,
    rate_limit: float | None = None,
    rate_burst: int | None = None,
) -> tuple[str, str]:
    """Create the project ``project_name`` if needed and a new key for it, with
    its own rate limit if given (else the gateway's ``RATE_LIMIT``).

    Returns ``(project_id, key)``; the key is not stored and cannot be shown again.
    """
    key = generate_api_key()
    project_id = await db.write(_create_api_key, project_name, key, rate_limit, rate_burst)
    return project_id, key


def is_active(now: dt.datetime | None = None) -> sa.ColumnElement[bool]:
    """A key not revoked, or whose revocation is still ahead (a rotation's grace)."""
    return sa.or_(api_keys.c.revoked_at.is_(None), api_keys.c.revoked_at > (now or utcnow()))


def _find_key(conn: sa.Connection, digest: str) -> sa.Row[Any] | None:
    return conn.execute(
        sa.select(
            api_keys.c.id, api_keys.c.project_id, api_keys.c.rate_limit, api_keys.c.rate_burst
        ).where(api_keys.c.key_hash == digest, is_active())
    ).first()


class KeyNotFound(LookupError):
    """No key has that ID (nor is that key), or none that is still active."""


def _key_row(conn: sa.Connection, ref: str) -> sa.Row[Any]:
    # An ID as `keys list` shows it, or the key itself (a leaked key can be
    # revoked by whoever holds it, without looking up its ID).
    where = (
        api_keys.c.key_hash == hash_api_key(ref)
        if ref.startswith(KEY_PREFIX)
        else api_keys.c.id == ref
    )
    row = conn.execute(sa.select(api_keys).where(where)).first()
    if row is None:
        raise KeyNotFound(f"no such key: {ref}")
    return row


def list_api_keys(conn: sa.Connection, project: str | None = None) -> list[dict[str, Any]]:
    """Every key (of the project with that name or ID, if given), oldest first."""
    query = (
        sa.select(
            api_keys.c.id,
            api_keys.c.prefix,
            api_keys.c.created_at,
            api_keys.c.revoked_at,
            api_keys.c.rate_limit,
            api_keys.c.rate_burst,
            projects.c.id.label("project_id"),
            projects.c.name.label("project"),
        )
        .select_from(api_keys.join(projects, projects.c.id == api_keys.c.project_id))
        .order_by(api_keys.c.created_at, api_keys.c.id)
    )
    if project is not None:
        query = query.where(sa.or_(projects.c.name == project, projects.c.id == project))
    return [dict(row._mapping) for row in conn.execute(query)]


def revoke_api_key(conn: sa.Connection, ref: str, grace: float = 0.0) -> dict[str, Any]:
    """Revoke the key ``ref`` (its ID, or the key), at once or after ``grace``
    seconds. A key already revoked keeps the earlier time. Returns the key's row."""
    row = _key_row(conn, ref)
    at = utcnow() + dt.timedelta(seconds=grace)
    if row.revoked_at is None or row.revoked_at > at:
        conn.execute(api_keys.update().where(api_keys.c.id == row.id).values(revoked_at=at))
        if grace <= 0:
            # Its dashboard sessions end with it (a session also checks the key).
            conn.execute(
                sessions.update()
                .where(sessions.c.key_id == row.id, sessions.c.ended_at.is_(None))
                .values(ended_at=at)
            )
    return {**row._mapping, "revoked_at": min(at, row.revoked_at or at)}


def rotate_api_key(conn: sa.Connection, ref: str, grace: float = 0.0) -> tuple[str, str]:
    """A new key for the project of key ``ref``, with its rate limit; ``ref``
    is revoked after ``grace`` seconds. Returns ``(old key ID, new key)``."""
    old = _key_row(conn, ref)
    if old.revoked_at is not None and old.revoked_at <= utcnow():
        raise KeyNotFound(f"key {ref} is revoked already: `gateway keys create` makes a new one")
    name = conn.scalar(sa.select(projects.c.name).where(projects.c.id == old.project_id))
    key = generate_api_key()
    _create_api_key(conn, str(name), key, old.rate_limit, old.rate_burst)
    revoke_api_key(conn, old.id, grace)
    return str(old.id), key


async def api_key_exists(db: Database, key: str) -> bool:
    return await db.read(_find_key, hash_api_key(key)) is not None


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request acts for."""

    project_id: str
    key_id: str
    #: Requests per second this key may make (0: no limit), and its burst.
    rate_limit: float = 0.0
    rate_burst: int = 0


class ApiKeyAuth:
    """Resolves ``Authorization: Bearer <key>`` to a :class:`Principal`.

    Found keys are remembered for ``ttl`` seconds so the hot trigger path
    costs no database read (one per key per second at most); a revoked key
    stops working within that time, in every process. Requests that miss
    the same key together (its entry ran out under load: every client's
    next request) share one read.
    """

    def __init__(
        self,
        db: Database,
        *,
        ttl: float = 1.0,
        max_entries: int = 10_000,
        limiter: RateLimiter | None = None,
        default_rate: float = 0.0,
        default_burst: int = 0,
    ) -> None:
        self.db = db
        self.limiter = limiter
        self.default_rate = default_rate
        self.default_burst = default_burst
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, Principal]] = {}
        #: The reads under way, by key digest, for the requests that wait on them.
        self._reading: dict[str, asyncio.Future[Principal]] = {}

    async def authenticate(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if not header:
            raise Unauthorized(
                "missing Authorization header; send `Authorization: Bearer <API key>`",
                code="missing_api_key",
            )
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized(
                "the Authorization header must be `Bearer <API key>`", code="invalid_api_key"
            )
        principal = await self.resolve(key)
        if principal.rate_limit > 0 and self.limiter is not None:
            await self.limiter.check(principal.key_id, principal.rate_limit, principal.rate_burst)
        return principal

    async def resolve(self, key: str) -> Principal:
        digest = hash_api_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        reading = self._reading.get(digest)
        if reading is None:
            # A task of its own: a request that goes away does not take the
            # read from the others waiting on it.
            reading = asyncio.get_running_loop().create_task(
                self._read(digest, now), context=contextvars.Context()
            )
            self._reading[digest] = reading
            reading.add_done_callback(lambda done: self._read_over(digest, done))
        return await asyncio.shield(reading)

    def _read_over(self, digest: str, done: asyncio.Future[Principal]) -> None:
        del self._reading[digest]
        if not done.cancelled():
            done.exception()  # heard, even when every request waiting went away

    async def _read(self, digest: str, now: float) -> Principal:
        row = await self.db.read(_find_key, digest)
        if row is None:
            raise Unauthorized("the API key is not valid", code="invalid_api_key")
        principal = Principal(
            project_id=row.project_id,
            key_id=row.id,
            rate_limit=row.rate_limit if row.rate_limit is not None else self.default_rate,
            rate_burst=row.rate_burst if row.rate_burst is not None else self.default_burst,
        )
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[digest] = (now + self.ttl, principal)
        return principal
