"""Bulk actions: cancel or replay every run a filter (or a list of IDs) selects.

An action is a row (``bulk_actions``) and is done in pages, each page one
transaction that acts on the next runs after the action's ``cursor`` and moves
the cursor with them, so a page that runs twice (a crash, a second gateway
resuming it) does nothing twice. It selects the runs made before the action
was: the runs a replay makes are never picked up by the same action.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from db.ids import new_id
from db.models import BulkAction
from db.rows import owned_row
from db.types import isoformat
from gateway.errors import NotFound
from gateway.runs.control import cancel_open_run
from gateway.runs.create import NewRun, create_runs, replay_row
from gateway.runs.effects import Effects
from gateway.runs.errors import LostRace
from gateway.runs.read import RunQuery, query_conditions
from gateway.runs.runs_table import runs

__all__ = [
    "ACTIONS",
    "BulkNotFound",
    "BulkPage",
    "bulk_page",
    "create_bulk",
    "load_bulk",
    "unfinished_bulks",
]

bulk_actions = BulkAction.__table__  # type: ignore[attr-defined]

ACTIONS = ("cancel", "replay")
#: Runs acted on in one transaction.
PAGE = 100


class BulkNotFound(NotFound):
    code = "bulk_not_found"

    def __init__(self, bulk_id: str) -> None:
        super().__init__(f"no bulk action with id {bulk_id!r}")


def _conditions(
    conn: sa.Connection, project_id: str, selection: Mapping[str, Any], made: dt.datetime
) -> list[Any]:
    if "ids" in selection:
        where = [runs.c.project_id == project_id, runs.c.id.in_(list(selection["ids"]))]
    else:
        f = selection.get("filter") or {}
        query = RunQuery(
            statuses=tuple(f.get("status") or ()),
            tasks=tuple(f.get("task") or ()),
            tag=f.get("tag"),
            queue=f.get("queue"),
            created_after=dt.datetime.fromisoformat(f["created_after"])
            if f.get("created_after")
            else None,
            created_before=dt.datetime.fromisoformat(f["created_before"])
            if f.get("created_before")
            else None,
        )
        where = query_conditions(conn, project_id, query)
    where.append(runs.c.created_at <= made)
    return where


def _view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "action": row["action"],
        "status": row["status"],
        "selection": row["selection"],
        "count": row["count"],
        "processed": row["processed"],
        "succeeded": row["succeeded"],
        "skipped": row["skipped"],
        "is_final": row["status"] == "completed",
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
        "finished_at": isoformat(row["finished_at"]),
    }


def create_bulk(
    conn: sa.Connection,
    project_id: str,
    action: str,
    selection: Mapping[str, Any],
    now: dt.datetime,
) -> dict[str, Any]:
    """Record the action and count the runs it selects; its pages come after."""
    count = conn.scalar(
        sa.select(sa.func.count()).where(*_conditions(conn, project_id, selection, now))
    )
    row = {
        "id": new_id("bulk"),
        "project_id": project_id,
        "action": action,
        "selection": dict(selection),
        "status": "running" if count else "completed",
        "count": int(count or 0),
        "processed": 0,
        "succeeded": 0,
        "skipped": 0,
        "cursor": None,
        "created_at": now,
        "updated_at": now,
        "finished_at": None if count else now,
    }
    conn.execute(bulk_actions.insert(), row)
    return _view(dict(row))


def load_bulk(conn: sa.Connection, project_id: str, bulk_id: str) -> dict[str, Any]:
    """:raises BulkNotFound: no such action in the project"""
    return _view(owned_row(conn, bulk_actions, bulk_id, project_id, BulkNotFound(bulk_id)))


@dataclasses.dataclass
class BulkPage:
    """What one page did: whether the action is done now, and the effects
    (aborts, callbacks, replays' jobs) to set in motion after the commit."""

    done: bool
    effects: Effects


def _replay(conn: sa.Connection, run_ids: Sequence[str], now: dt.datetime, done: Effects) -> int:
    originals = [
        dict(r)
        for r in conn.execute(sa.select(runs).where(runs.c.id.in_(list(run_ids)))).mappings()
    ]
    created = create_runs(conn, [NewRun(replay_row(o, now)) for o in originals])
    done.add(created.effects)
    return len(created.runs)


def bulk_page(conn: sa.Connection, bulk_id: str, now: dt.datetime) -> BulkPage:
    """Act on the next page of the action's runs and move its cursor past them.

    :raises LostRace: another process did this page meanwhile
    """
    bulk = (
        conn.execute(sa.select(bulk_actions).where(bulk_actions.c.id == bulk_id)).mappings().first()
    )
    if bulk is None or bulk["status"] != "running":
        return BulkPage(True, Effects())
    where = _conditions(conn, bulk["project_id"], bulk["selection"], bulk["created_at"])
    if bulk["cursor"] is not None:
        where.append(runs.c.id > bulk["cursor"])
    page = list(
        conn.execute(sa.select(runs.c.id).where(*where).order_by(runs.c.id).limit(PAGE)).scalars()
    )
    done = Effects()
    if bulk["action"] == "cancel":
        succeeded = sum(cancel_open_run(conn, run_id, now, done) for run_id in page)
    else:
        succeeded = _replay(conn, page, now, done) if page else 0
    finished = len(page) < PAGE
    processed = bulk["processed"] + len(page)
    # The count taken at the start is what was committed then; a run another
    # transaction had made before the action but committed after it is
    # selected too. Once done, the count is what the action went through.
    count = processed if finished else max(bulk["count"], processed)
    moved = conn.execute(
        bulk_actions.update()
        .where(
            bulk_actions.c.id == bulk_id,
            bulk_actions.c.status == "running",
            bulk_actions.c.cursor.is_(None)
            if bulk["cursor"] is None
            else bulk_actions.c.cursor == bulk["cursor"],
        )
        .values(
            cursor=page[-1] if page else bulk["cursor"],
            count=count,
            processed=processed,
            succeeded=bulk["succeeded"] + succeeded,
            skipped=bulk["skipped"] + len(page) - succeeded,
            status="completed" if finished else "running",
            updated_at=now,
            finished_at=now if finished else None,
        )
    )
    if moved.rowcount != 1:
        raise LostRace(bulk_id)
    return BulkPage(finished, done)


def unfinished_bulks(conn: sa.Connection, before: dt.datetime, limit: int = 20) -> list[str]:
    """Actions still running that nobody moved on since ``before`` (their
    process went away): the reconciler resumes them."""
    return list(
        conn.execute(
            sa.select(bulk_actions.c.id)
            .where(bulk_actions.c.status == "running", bulk_actions.c.updated_at < before)
            .order_by(bulk_actions.c.updated_at)
            .limit(limit)
        ).scalars()
    )
