"""What a database failure means for the unit of work that met it.

A lock conflict (a deadlock PostgreSQL broke) is run again after a pause; a
connection lost or a server starting up (transient) is run again on a fresh
connection for a few seconds; a server that cannot be reached is an
``OperationalError`` at once, which the API answers with 503. Used by
``db.engine.Database`` and its writers (``db.groups``).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = [
    "LOCK_CONFLICT_SECONDS",
    "TRANSIENT_RETRY_SECONDS",
    "is_lock_conflict",
    "is_transient",
    "pooled_connection",
    "retry_pauses",
    "unreachable_as_operational",
    "worth_retrying",
]

#: How long a unit PostgreSQL failed to break a deadlock (or a serialization
#: conflict) is run again, after a short random pause each time: under heavy
#: contention one unit can lose several times in a row.
LOCK_CONFLICT_SECONDS = 10.0
#: deadlock_detected, serialization_failure
_LOCK_CONFLICTS = frozenset({"40P01", "40001"})


def is_lock_conflict(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) in _LOCK_CONFLICTS


def _is_unreachable(exc: BaseException) -> bool:
    """The server did not answer or went away (not a unit's own error)."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


#: Seconds a unit keeps trying while the server restarts or a pooled
#: connection turns out dead, before its caller hears 503.
TRANSIENT_RETRY_SECONDS = 3.0
#: SQLSTATEs of a connection lost or refused for now: class 08 (connection
#: exceptions) and admin_shutdown, crash_shutdown, cannot_connect_now.
_TRANSIENT_STATES = ("08", "57P01", "57P02", "57P03")


def is_transient(exc: BaseException) -> bool:
    """The unit failed for its connection, not for itself: the server went
    away, is starting up, or the pooled connection was dead or left in a bad
    state (asyncpg's client-side errors). Another try on another connection
    may well succeed."""
    if _is_unreachable(exc) or isinstance(exc, sa.exc.PendingRollbackError):
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (OSError, TimeoutError, *_ASYNCPG_CLIENT_ERRORS)):
            return True
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and state.startswith(_TRANSIENT_STATES):
            return True
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    return False


_ASYNCPG_CLIENT_ERRORS = (
    asyncpg.exceptions.InterfaceError,  # "connection is closed"
    asyncpg.exceptions.InternalClientError,  # "cannot switch to state …"
)


def worth_retrying(exc: BaseException) -> bool:
    """Transient, and a fresh connection may well fix it: a pooled connection
    that died or was left in a bad state, a server starting up. Not a server
    that refuses or does not answer connections: that is down for now, and
    its callers hear 503 at once rather than after a budget of tries."""
    if not is_transient(exc):
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError | TimeoutError | socket.gaierror):
            return False
        cause = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
    return True


def retry_pauses(deadline: float) -> Iterator[float | None]:
    """The pauses between tries until ``deadline`` (backoff from 50 ms to
    1 s); the last is ``None``: no time for another try."""
    pause = 0.05
    while time.monotonic() + pause < deadline:
        yield pause
        pause = min(pause * 2, 1.0)
    yield None


@contextlib.asynccontextmanager
async def pooled_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection; one that failed for a transient reason is thrown
    away rather than put back (asyncpg can leave one in a state that fails
    every later use, which SQLAlchemy does not count as a disconnect)."""
    conn = await engine.connect()
    try:
        yield conn
    except BaseException as exc:
        if is_transient(exc) and not conn.invalidated:
            with contextlib.suppress(Exception):
                await conn.invalidate()
        raise
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


@contextlib.contextmanager
def unreachable_as_operational() -> Iterator[None]:
    """A server that cannot be reached, or a connection lost for good, is an
    ``OperationalError``, as SQLAlchemy reports most such failures: the API
    answers it with 503 and ``Retry-After``. (asyncpg raises the socket's own
    ``OSError`` when it cannot connect, and its own errors for a server that
    is starting up or a connection left in a bad state.)"""
    try:
        yield
    except sa.exc.OperationalError:
        raise
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise sa.exc.OperationalError("(reaching the database)", None, exc) from exc
