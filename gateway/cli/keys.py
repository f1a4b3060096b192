"""``gateway keys``: create, list, revoke and rotate API keys, straight on the
database (whoever runs it holds ``DATABASE_URL``, so no key is needed to manage
keys; the arguments are parsed in ``gateway.cli``). A revoked key stops working
everywhere within a second: every gateway process remembers a key for one
second at most (``gateway.auth.keys``), and its dashboard sessions end with it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa

from db.engine import Database
from db.types import utcnow
from gateway.auth.keys import (
    KeyNotFound,
    create_api_key,
    list_api_keys,
    revoke_api_key,
    rotate_api_key,
)
from gateway.settings import Settings

__all__ = ["keys_command"]

T = TypeVar("T")


def _on_db(settings: Settings, fn: Callable[[sa.Connection], T], *, write: bool) -> T:
    async def go() -> T:
        db = Database(settings.database_url)
        try:
            return await (db.write(fn) if write else db.read(fn))
        finally:
            await db.dispose()

    return asyncio.run(go())


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _state(revoked_at: dt.datetime | None, now: dt.datetime) -> str:
    if revoked_at is None:
        return "active"
    if revoked_at > now:
        return f"active until {_when(revoked_at)}"
    return f"revoked {_when(revoked_at)}"


def keys_command(settings: Settings, args: argparse.Namespace) -> int:
    action = args.keys_command
    if action == "create":
        return _create(settings, args.name, args.rate_limit, args.burst)
    try:
        if action == "list":
            rows = _on_db(settings, lambda c: list_api_keys(c, args.project), write=False)
            now = utcnow()
            for row in rows:
                limit = "" if row["rate_limit"] is None else f"  {row['rate_limit']:g}/s"
                print(
                    f"{row['id']}  {row['project']:<20} {row['prefix']}…  "
                    f"created {_when(row['created_at'])}  {_state(row['revoked_at'], now)}{limit}"
                )
            if not rows:
                print("no keys yet: `gateway keys create NAME` makes one", file=sys.stderr)
            return 0
        if action == "revoke":
            row = _on_db(settings, lambda c: revoke_api_key(c, args.key, args.grace), write=True)
            print(f"{row['id']} ({row['prefix']}…): {_state(row['revoked_at'], utcnow())}")
            return 0
        old_id, key = _on_db(
            settings, lambda c: rotate_api_key(c, args.key, args.grace), write=True
        )
        print(f"{old_id}: revoked {'now' if not args.grace else f'in {args.grace:g} s'}")
        print("new API key (shown once; only its hash is stored):")
        print(key)
        return 0
    except KeyNotFound as exc:
        print(f"gateway: {exc.args[0]} (`gateway keys list` shows the keys)", file=sys.stderr)
        return 1


def _create(settings: Settings, name: str, rate_limit: float | None, burst: int | None) -> int:
    async def create() -> tuple[str, str]:
        db = Database(settings.database_url)
        try:
            return await create_api_key(db, name, rate_limit=rate_limit, rate_burst=burst)
        finally:
            await db.dispose()

    project_id, key = asyncio.run(create())
    print(f"project {name!r} ({project_id})")
    print("new API key (shown once; only its hash is stored):")
    print(key)
    return 0
