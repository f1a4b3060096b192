"""A queue's rule and the runs that hold its slots: what admission, the pump,
the queues' views and a run's ``waiting_for`` all read (``gateway.queues.admission``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db.models import Queue, RunStatus
from db.types import isoformat
from gateway.runs.runs_table import run_nodes, runs
from jobs.tasks.registry import registry

__all__ = [
    "QueueRule",
    "default_queue",
    "holding_slot",
    "in_queue",
    "insert_queue",
    "key_is",
    "queues",
    "read_rule",
    "running_by_key",
    "select_queue",
    "waiting_for",
]

queues = Queue.__table__  # type: ignore[attr-defined]

_QUEUED = RunStatus.QUEUED.value
_EXECUTING = RunStatus.EXECUTING.value


@dataclasses.dataclass(frozen=True)
class QueueRule:
    """What a queue allows: ``limit`` runs at once (per concurrency key), or
    none while ``paused``."""

    limit: int | None = None
    paused: bool = False

    @property
    def gated(self) -> bool:
        return self.paused or self.limit is not None


def default_queue(task: str) -> tuple[str, int | None]:
    """A task's own queue and its declared limit (``@task(queue=…, concurrency_limit=…)``)."""
    definition = registry.get(task)
    if definition is None:
        return task, None
    return definition.queue or task, definition.concurrency_limit


select_queue = sa.select(queues).where(
    queues.c.project_id == sa.bindparam("project_id"), queues.c.name == sa.bindparam("name")
)


def insert_queue(conn: sa.Connection, values: Mapping[str, Any]) -> None:
    """Insert a queue's row unless one is there (another process made it first)."""
    insert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(queues)
    conn.execute(insert.values(**values).on_conflict_do_nothing())


def read_rule(conn: sa.Connection, project_id: str, name: str) -> QueueRule:
    """The queue's rule as its row says (no row: no limit, not paused)."""
    row = conn.execute(select_queue, {"project_id": project_id, "name": name}).mappings().first()
    return QueueRule() if row is None else QueueRule(row["concurrency_limit"], row["paused"])


def key_is(key: str | None) -> Any:
    return runs.c.concurrency_key.is_(None) if key is None else runs.c.concurrency_key == key


def in_queue(project_id: str, queue: str) -> list[Any]:
    return [runs.c.project_id == project_id, runs.c.queue == queue]


def holding_slot() -> Any:
    """Runs that hold one of their queue's slots: handed to arq, or executing."""
    return sa.or_(
        sa.and_(runs.c.status == _QUEUED, runs.c.held.is_(False)), runs.c.status == _EXECUTING
    )


def running_by_key(conn: sa.Connection, project_id: str, queue: str) -> dict[str | None, int]:
    rows = conn.execute(
        sa.select(runs.c.concurrency_key, sa.func.count())
        .where(*in_queue(project_id, queue), holding_slot())
        .group_by(runs.c.concurrency_key)
    )
    return {key: int(count) for key, count in rows}


def waiting_for(conn: sa.Connection, run: Mapping[str, Any]) -> dict[str, Any] | None:
    """Why a run that is not executing has not started (``None`` if it has, or is final)."""
    status = run["status"]
    if status == RunStatus.DELAYED.value:
        kind = "debounce" if run.get("debounce_key") else "delay"
        return {"kind": kind, "until": isoformat(run["run_at"])}
    if status == RunStatus.RETRYING.value:
        return {"kind": "retry", "until": isoformat(run["run_at"])}
    if status == RunStatus.WAITING.value:
        waiting = conn.execute(
            sa.select(run_nodes.c.node_id, run_nodes.c.waitpoint_id)
            .where(
                run_nodes.c.parent_id == run["id"],
                run_nodes.c.status == "waiting",
                run_nodes.c.waitpoint_id.is_not(None),
            )
            .order_by(run_nodes.c.id)
            .limit(1)
        ).first()
        if waiting is not None:
            return {"kind": "waitpoint", "node": waiting[0], "waitpoint": waiting[1]}
        return {"kind": "children"}
    if status != _QUEUED:
        return None
    if not run.get("held"):
        return {"kind": "worker"}
    project_id, queue, key = run["project_id"], run["queue"], run.get("concurrency_key")
    rule = read_rule(conn, project_id, queue)
    if rule.paused:
        return {"kind": "paused", "queue": queue}
    running = int(
        conn.scalar(
            sa.select(sa.func.count()).where(
                *in_queue(project_id, queue), key_is(key), holding_slot()
            )
        )
        or 0
    )
    if key is not None:
        return {
            "kind": "concurrency_key",
            "queue": queue,
            "key": key,
            "running": running,
            "limit": rule.limit,
        }
    return {"kind": "queue_concurrency", "queue": queue, "running": running, "limit": rule.limit}
