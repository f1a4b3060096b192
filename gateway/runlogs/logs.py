"""A run's log lines (``ctx.logger``, shipped by ``jobs.runs.runlog``): kept, capped, read back.

Lines are kept in the order they arrive (their ``id``), each with its attempt.
A run keeps ``RUN_LOG_MAX_LINES`` lines; past that, one ``dropped`` line says
how many more were turned away, and is brought up to date as they come.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db.models import RunLog
from db.types import isoformat, to_utc
from gateway.runs.errors import RunNotFound
from gateway.runs.runs_table import runs
from jobs.protocol import RunLogs

__all__ = ["append_logs", "list_logs", "logs_since"]

run_logs = RunLog.__table__  # type: ignore[attr-defined]


def _time(raw: str, now: dt.datetime) -> dt.datetime:
    """A line's time as the worker gave it; ``now`` if it is not a time, or
    more than a day away from now (a worker's clock is not to be trusted blindly)."""
    try:
        when = to_utc(dt.datetime.fromisoformat(raw.replace("Z", "+00:00")))
    except (ValueError, OverflowError):
        return now
    return when if abs(when - now) < dt.timedelta(days=1) else now


def append_logs(
    conn: sa.Connection, batches: Sequence[RunLogs], cap: int, now: dt.datetime
) -> list[str]:
    """Keep the lines of these batches, at most ``cap`` per run; the runs that
    got lines (their waiters wake).

    :raises RunNotFound: a batch names no run
    """
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    changed: list[str] = []
    for batch in batches:
        if conn.scalar(sa.select(runs.c.id).where(runs.c.id == batch.run_id)) is None:
            raise RunNotFound(batch.run_id)
        kept = int(
            conn.scalar(
                sa.select(sa.func.count()).where(
                    run_logs.c.run_id == batch.run_id, run_logs.c.kind == "line"
                )
            )
            or 0
        )
        room = max(0, cap - kept)
        rows = [
            {
                "run_id": batch.run_id,
                "attempt": batch.attempt,
                "key": f"{batch.batch}:{i}",
                "kind": "line",
                "ts": _time(line.ts, now),
                "level": line.level,
                "message": line.message,
                "fields": line.fields,
            }
            for i, line in enumerate(batch.lines[:room])
        ]
        if rows:
            conn.execute(insert(run_logs).values(rows).on_conflict_do_nothing())
        dropped = len(batch.lines) - len(rows)
        if dropped or batch.dropped:
            _count_dropped(conn, batch, dropped, cap, now)
        changed.append(batch.run_id)
    return changed


#: Batches whose worker-side drops a run's ``dropped`` line remembers, so a
#: batch sent twice is counted once.
_SEEN_BATCHES = 100


def _count_dropped(
    conn: sa.Connection, batch: RunLogs, here: int, cap: int, now: dt.datetime
) -> None:
    """Add to the run's ``dropped`` line: ``here`` lines this gateway turned
    away (past the cap), and what the worker left out (``batch.dropped``)."""
    run_id = batch.run_id
    where = (run_logs.c.run_id == run_id, run_logs.c.kind == "dropped")
    found = conn.execute(sa.select(run_logs.c.fields).where(*where)).first()
    fields = dict(found[0] or {}) if found else {}
    seen: list[str] = list(fields.get("batches", []))
    by_worker = batch.dropped if batch.batch not in seen else 0
    if batch.dropped:
        seen = [*seen, batch.batch][-_SEEN_BATCHES:]
    total = here + by_worker + int(fields.get("dropped", 0))
    if total == int(fields.get("dropped", 0)) and found is not None:
        return
    values = {
        "fields": {"dropped": total, "batches": seen},
        "message": (
            f"{total} more log line(s) dropped: a run keeps {cap} (RUN_LOG_MAX_LINES), "
            "and a worker leaves out what it cannot ship"
        ),
        "ts": now,
        "attempt": batch.attempt,
    }
    if found is not None:
        conn.execute(run_logs.update().where(*where).values(values))
    else:
        conn.execute(
            run_logs.insert(),
            {
                "run_id": run_id,
                "key": f"{run_id}:dropped",
                "kind": "dropped",
                "level": "WARNING",
                **values,
            },
        )


def _view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "ts": isoformat(row.ts),
        "level": row.level,
        "message": row.message,
        "attempt": row.attempt,
        # A dropped line's own bookkeeping (the batches it counted) stays in.
        "fields": {k: v for k, v in (row.fields or {}).items() if k != "batches"},
    }


def list_logs(
    conn: sa.Connection, project_id: str | None, run_id: str, limit: int, cursor: int | None
) -> dict[str, Any]:
    """A page of the run's lines, oldest first; ``project_id=None`` skips the
    owner check (a public access token's read).

    :raises RunNotFound: no such run (in the project)
    """
    owner = sa.select(runs.c.project_id).where(runs.c.id == run_id)
    found = conn.execute(owner).first()
    if found is None or (project_id is not None and found[0] != project_id):
        raise RunNotFound(run_id)
    where = [run_logs.c.run_id == run_id]
    if cursor is not None:
        where.append(run_logs.c.id > cursor)
    rows = conn.execute(
        sa.select(run_logs).where(*where).order_by(run_logs.c.id).limit(limit + 1)
    ).all()
    page = rows[:limit]
    return {
        "data": [_view(r) for r in page],
        "next_cursor": str(page[-1].id) if len(rows) > limit else None,
    }


def logs_since(conn: sa.Connection, run_id: str, after: int) -> list[dict[str, Any]]:
    """The run's lines after the one with ID ``after``, in order (an event stream's read)."""
    rows = conn.execute(
        sa.select(run_logs)
        .where(run_logs.c.run_id == run_id, run_logs.c.id > after)
        .order_by(run_logs.c.id)
        .limit(500)
    ).all()
    return [_view(r) for r in rows]
