"""Creating runs (one, or a batch), and the idempotency keys that give back an earlier one."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db.models import Batch, IdempotencyKey, RunStatus
from db.types import utcnow
from gateway.runs.cas import insert_run, run_transitions, runs
from gateway.runs.errors import LostRace
from gateway.runs.read import load_run, run_view
from jobs.protocol import WORKFLOW_TASK

__all__ = ["NewRun", "create_runs"]

idempotency_keys = IdempotencyKey.__table__  # type: ignore[attr-defined]
batches = Batch.__table__  # type: ignore[attr-defined]

#: A run ended in one of these lets its idempotency key start a new run.
_REUSABLE = (RunStatus.FAILED.value, RunStatus.CANCELED.value, RunStatus.EXPIRED.value)


def _claim_key(conn: sa.Connection, row: Mapping[str, Any], key: str, ttl: float) -> str | None:
    """Point the idempotency key at ``row``'s run; or return the run it already
    names, if that one still counts. :class:`LostRace` if another trigger with
    the same key got there in the same instant."""
    now = row["created_at"]
    expires = now + dt.timedelta(seconds=ttl)
    scope = (
        idempotency_keys.c.project_id == row["project_id"],
        idempotency_keys.c.task == row["task"],
        idempotency_keys.c.key == key,
    )
    existing = conn.execute(sa.select(idempotency_keys).where(*scope)).mappings().first()
    if existing is None:
        values = {
            "project_id": row["project_id"],
            "task": row["task"],
            "key": key,
            "run_id": row["id"],
            "expires_at": expires,
        }
        insert = (
            (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(idempotency_keys)
            .values(**values)
            .on_conflict_do_nothing()
        )
        if conn.execute(insert).rowcount != 1:
            raise LostRace(row["id"])
        return None
    if existing["expires_at"] > now:
        status = conn.scalar(sa.select(runs.c.status).where(runs.c.id == existing["run_id"]))
        if status is not None and status not in _REUSABLE:
            return str(existing["run_id"])
    moved = conn.execute(
        idempotency_keys.update()
        .where(*scope, idempotency_keys.c.run_id == existing["run_id"])
        .values(run_id=row["id"], expires_at=expires)
    )
    if moved.rowcount != 1:
        raise LostRace(row["id"])
    return None


@dataclasses.dataclass(frozen=True)
class NewRun:
    """A run's row, ready to insert, and how long its idempotency key lasts."""

    row: dict[str, Any]
    idempotency_ttl: float = 0.0


def create_runs(
    conn: sa.Connection, new: list[NewRun], batch_id: str | None = None
) -> list[tuple[dict[str, Any], bool]]:
    """Insert runs (QUEUED or DELAYED); for each, its view and whether it is an
    earlier run given back for its idempotency key."""
    out: list[tuple[dict[str, Any], bool]] = []
    if batch_id is not None:
        conn.execute(
            batches.insert(),
            {
                "id": batch_id,
                "project_id": new[0].row["project_id"],
                "count": len(new),
                "created_at": utcnow(),
            },
        )
    for item in new:
        row = item.row
        insert_run(conn, row)
        key = row.get("idempotency_key")
        if key:
            cached = _claim_key(conn, row, key, item.idempotency_ttl)
            if cached is not None:
                conn.execute(run_transitions.delete().where(run_transitions.c.run_id == row["id"]))
                conn.execute(runs.delete().where(runs.c.id == row["id"]))
                view = load_run(conn, None, cached)
                assert view is not None
                out.append((view, True))
                continue
        out.append((run_view(row, [], {} if row["task"] == WORKFLOW_TASK else None), False))
    return out
