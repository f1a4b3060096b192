"""Runs as the API shows them: one run (with its attempts and a workflow's
nodes), pages of runs, counts by status, a batch, a run's status changes."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from db.models import Batch, RunStatus, Waitpoint
from db.types import isoformat
from gateway.queues.slots import waiting_for
from gateway.runs.effects import Job, job_of
from gateway.runs.runs_table import (
    LOAD_ATTEMPTS,
    LOAD_OWN_RUN,
    LOAD_RUN,
    LOAD_RUNS,
    LOAD_RUNS_ATTEMPTS,
    LOAD_RUNS_WITH_ATTEMPTS,
    run_nodes,
    run_transitions,
    runs,
)
from jobs import tracing
from jobs.protocol import WORKFLOW_TASK

__all__ = [
    "JOB_COLUMNS",
    "RunQuery",
    "batch_summary",
    "count_by_status",
    "list_runs",
    "load_rows",
    "load_run",
    "load_views",
    "node_states",
    "query_conditions",
    "run_job",
    "run_view",
    "status_of",
    "step_views",
    "transitions_since",
    "view_of",
    "view_of_row",
    "with_attempts",
]

batches = Batch.__table__  # type: ignore[attr-defined]
waitpoints = Waitpoint.__table__  # type: ignore[attr-defined]


def node_states(conn: sa.Connection, parent_id: str) -> dict[str, Any]:
    """The workflow's node states, as a step job takes them."""
    states: dict[str, Any] = {}
    for r in conn.execute(
        sa.select(run_nodes).where(run_nodes.c.parent_id == parent_id)
    ).mappings():
        state: dict[str, Any] = {"status": r["status"], "run_id": r["run_id"]}
        if r["output"] is not None:
            state["output"] = r["output"]
        if r["error_code"] is not None:
            state["error"] = {"code": r["error_code"], "message": r["error_message"]}
        if r["kind"] is not None:  # a durable task's step
            state.update(kind=r["kind"], position=r["position"])
        states[r["node_id"]] = state
    return states


#: The columns :func:`run_job` reads of a run (a query that builds jobs selects these).
JOB_COLUMNS = (
    runs.c.id,
    runs.c.project_id,
    runs.c.task,
    runs.c.payload,
    runs.c.attempt,
    runs.c.step,
    runs.c.max_duration,
    runs.c.priority,
    runs.c.traceparent,
)


def run_job(conn: sa.Connection, run: Mapping[str, Any]) -> Job:
    """The job of ``run``'s current attempt and step, as every path that queues a
    run builds it (its limits and priority included); a workflow's job takes its
    nodes' states (a replay's first step already has some), and a durable
    task's its kept steps (after a wait, or when an attempt that kept some
    runs again)."""
    kept = bool(run.get("step")) or run.get("attempt", 1) > 1 or run["task"] == WORKFLOW_TASK
    return job_of(run, state=node_states(conn, run["id"]) if kept else None)


def _duration_ms(started: dt.datetime | None, finished: dt.datetime | None) -> int | None:
    if started is None or finished is None:
        return None
    return max(0, round((finished - started).total_seconds() * 1000))


def error_view(code: str | None, message: str | None) -> dict[str, Any] | None:
    if code is None:
        return None
    return {"code": code, "message": message or ""}


def run_view(
    row: Mapping[str, Any],
    attempts: Iterable[Mapping[str, Any]],
    nodes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A run as the API shows it."""
    status = RunStatus(row["status"])
    started, finished = row["started_at"], row["finished_at"]
    view = {
        "id": row["id"],
        "task": row["task"],
        "status": status.value,
        "is_final": status.is_final,
        "payload": row["payload"],
        "output": row["output"],
        "error": error_view(row["error_code"], row["error_message"]),
        "attempt": row["attempt"],
        "attempts": [
            {
                "number": a["number"],
                "status": a["status"],
                "worker_id": a["worker_id"],
                "started_at": isoformat(a["started_at"]),
                "finished_at": isoformat(a["finished_at"]),
                "error": error_view(a["error_code"], a["error_message"]),
            }
            for a in attempts
        ],
        "tags": list(row["tags"] or []),
        "metadata": dict(row["metadata"] or {}),
        "parent_id": row.get("parent_id"),
        "node_id": row.get("node_id"),
        "replayed_from": row.get("replayed_from"),
        "queue": row.get("queue") or row["task"],
        "concurrency_key": row.get("concurrency_key"),
        "priority": row.get("priority") or 0,
        "schedule_id": row.get("schedule_id"),
        "scheduled_at": isoformat(row.get("scheduled_at")),
        "trace_id": tracing.trace_id_of(row.get("traceparent")),
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
        "started_at": isoformat(started),
        "finished_at": isoformat(finished),
        "duration_ms": _duration_ms(started, finished),
    }
    if nodes is not None:
        view["nodes"] = nodes
    return view


def _node_views(conn: sa.Connection, row: Mapping[str, Any]) -> dict[str, Any]:
    """Every node of a workflow: its status (its child run's while it runs), child
    run ID, output and error, so an editor can colour each node."""
    child = runs.alias("child")
    found = {
        r["node_id"]: r
        for r in conn.execute(
            sa.select(run_nodes, child.c.status.label("child_status"))
            .select_from(run_nodes.outerjoin(child, child.c.id == run_nodes.c.run_id))
            .where(run_nodes.c.parent_id == row["id"])
        ).mappings()
    }
    graph = row["payload"].get("nodes", []) if isinstance(row["payload"], dict) else []
    views: dict[str, Any] = {}
    for node in graph:
        node_id = node.get("id") if isinstance(node, dict) else None
        if not isinstance(node_id, str):
            continue
        r = found.get(node_id)
        if r is None:
            status = "SKIPPED" if RunStatus(row["status"]).is_final else "PENDING"
            views[node_id] = {
                "type": node.get("type"),
                "status": status,
                "run_id": None,
                "output": None,
                "error": None,
            }
            continue
        status = (
            r["child_status"]
            if r["status"] == "running" and r["child_status"]
            else (r["status"].upper())
        )
        views[node_id] = {
            "type": node.get("type"),
            "status": status,
            "run_id": r["run_id"],
            "output": r["output"],
            "error": error_view(r["error_code"], r["error_message"]),
        }
        if r["status"] == "waiting" and r["waitpoint_id"]:
            # The service adds its signed URL.
            views[node_id]["waitpoint"] = {"id": r["waitpoint_id"]}
    return views


def step_views(conn: sa.Connection, run_id: str) -> list[dict[str, Any]]:
    """A durable task's steps in the order its code took them: name, kind,
    status, times, output or error, and the child runs or waitpoint of a wait."""
    rows = [
        dict(r)
        for r in conn.execute(
            sa.select(run_nodes).where(run_nodes.c.parent_id == run_id).order_by(run_nodes.c.id)
        ).mappings()
    ]
    children = {r["node_id"]: r["run_id"] for r in rows if r["kind"] is None}
    views = []
    for r in sorted((r for r in rows if r["position"] is not None), key=lambda r: r["position"]):
        view: dict[str, Any] = {
            "name": r["node_id"],
            "kind": r["kind"],
            "status": r["status"].upper(),
            "started_at": isoformat(r["started_at"]),
            "finished_at": isoformat(r["finished_at"]),
            "duration_ms": _duration_ms(r["started_at"], r["finished_at"]),
            "output": r["output"],
            "error": error_view(r["error_code"], r["error_message"]),
        }
        if r["kind"] == "child":
            view["runs"] = [r["run_id"]] if r["run_id"] else []
        elif r["kind"] == "batch":
            view["runs"] = [
                children[f"{r['node_id']}[{i}]"]
                for i in range(len(children))
                if f"{r['node_id']}[{i}]" in children
            ]
        if r["waitpoint_id"] is not None:
            view["waitpoint"] = r["waitpoint_id"]
        views.append(view)
    return views


def _durable_wait(conn: sa.Connection, run_id: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """What a WAITING durable task waits on: the step its code stopped at."""
    waiting = next((s for s in reversed(steps) if s["status"] in ("RUNNING", "WAITING")), None)
    if waiting is None:
        return {"kind": "children"}
    if waiting["kind"] in ("child", "batch"):
        return {"kind": "children", "step": waiting["name"], "runs": waiting.get("runs", [])}
    found: dict[str, Any] = {"kind": waiting["kind"], "step": waiting["name"]}
    if waiting.get("waitpoint"):
        found["waitpoint"] = waiting["waitpoint"]
        until = conn.scalar(
            sa.select(waitpoints.c.timeout_at).where(waitpoints.c.id == waiting["waitpoint"])
        )
        found["until"] = isoformat(until)
    return found


def load_run(conn: sa.Connection, project_id: str | None, run_id: str) -> dict[str, Any] | None:
    """The run's view, or ``None``; ``project_id=None`` skips the owner check."""
    if project_id is None:
        found = conn.execute(LOAD_RUN, {"run_id": run_id})
    else:
        found = conn.execute(LOAD_OWN_RUN, {"run_id": run_id, "project_id": project_id})
    row = found.mappings().first()
    if row is None:
        return None
    attempts = conn.execute(LOAD_ATTEMPTS, {"run_id": run_id}).mappings()
    return _view(conn, dict(row), [dict(a) for a in attempts])


def load_views(conn: sa.Connection, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The views of many runs, by ID: one read for all on PostgreSQL (two on
    SQLite), and a few more for each that has steps or nodes; missing runs
    are left out."""
    rows = load_rows(conn, run_ids)
    if conn.dialect.name != "postgresql":
        with_attempts(conn, list(rows.values()))
    return {run_id: view_of_row(conn, row) for run_id, row in rows.items()}


def load_rows(
    conn: sa.Connection, run_ids: Sequence[str], query: sa.Select[Any] | None = None, **params: Any
) -> dict[str, dict[str, Any]]:
    """Many runs' whole rows by ID, with ``has_nodes``; on PostgreSQL with
    their ``attempts`` too, in the same read (on SQLite: :func:`with_attempts`).
    ``query``: PostgreSQL's read with more columns (and their ``params``)."""
    dialect, ids = conn.dialect.name, {"run_ids": list(run_ids), **params}
    if dialect == "postgresql":
        rows = {}
        for found in conn.execute(
            LOAD_RUNS_WITH_ATTEMPTS if query is None else query, ids
        ).mappings():
            row = dict(found)
            row["attempts"] = [_attempt_of(a) for a in row.pop("attempts_json")]
            rows[row["id"]] = row
        return rows
    return {row["id"]: dict(row) for row in conn.execute(LOAD_RUNS[dialect], ids).mappings()}


def with_attempts(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Read the ``attempts`` of rows that have none yet (SQLite's :func:`load_rows`)."""
    wanted = {row["id"]: row for row in rows if "attempts" not in row}
    if not wanted:
        return
    for row in wanted.values():
        row["attempts"] = []
    query = LOAD_RUNS_ATTEMPTS[conn.dialect.name]
    for attempt in conn.execute(query, {"run_ids": list(wanted)}).mappings():
        wanted[attempt["run_id"]]["attempts"].append(dict(attempt))


def view_of_row(conn: sa.Connection, row: dict[str, Any]) -> dict[str, Any]:
    """The view of a run from its whole row, ``has_nodes`` and ``attempts``
    (:func:`load_rows`), as this transaction has them: a few reads more only
    for a run with steps or nodes."""
    return _view(conn, row, row["attempts"])


def _attempt_of(found: dict[str, Any]) -> dict[str, Any]:
    """An attempt as PostgreSQL's ``json_build_object`` gave it, its times
    parsed (``runs_table.LOAD_RUNS_WITH_ATTEMPTS``)."""
    for name in ("started_at", "finished_at"):
        if found[name] is not None:
            found[name] = dt.datetime.fromisoformat(found[name])
    return found


def _view(
    conn: sa.Connection, row: dict[str, Any], attempts: list[dict[str, Any]]
) -> dict[str, Any]:
    workflow = row["task"] == WORKFLOW_TASK
    nodes = _node_views(conn, row) if workflow else None
    view = run_view(row, attempts, nodes)
    if workflow:
        view["waiting_for"] = waiting_for(conn, row)
        return view
    view["steps"] = step_views(conn, row["id"]) if row["has_nodes"] else []
    if row["status"] == RunStatus.WAITING.value:
        view["waiting_for"] = _durable_wait(conn, row["id"], view["steps"])
    else:
        view["waiting_for"] = waiting_for(conn, row)
    return view


_STATUS = sa.select(runs.c.status).where(runs.c.id == sa.bindparam("run_id"))
_OWN_STATUS = _STATUS.where(runs.c.project_id == sa.bindparam("project_id"))


def status_of(conn: sa.Connection, project_id: str | None, run_id: str) -> str | None:
    """The run's status (one column of one row), or ``None``; ``project_id=None``
    skips the owner check."""
    if project_id is None:
        return conn.scalar(_STATUS, {"run_id": run_id})
    return conn.scalar(_OWN_STATUS, {"run_id": run_id, "project_id": project_id})


def view_of(conn: sa.Connection, run: Mapping[str, Any]) -> dict[str, Any]:
    """The view of a run this transaction has just read or written."""
    view = load_run(conn, None, run["id"])
    assert view is not None
    return view


def transitions_since(conn: sa.Connection, run_id: str, after: int) -> list[dict[str, Any]]:
    """The run's status changes after the one with ID ``after``, in order."""
    rows = conn.execute(
        sa.select(run_transitions)
        .where(run_transitions.c.run_id == run_id, run_transitions.c.id > after)
        .order_by(run_transitions.c.id)
    ).mappings()
    return [dict(r) for r in rows]


@dataclasses.dataclass(frozen=True)
class RunQuery:
    statuses: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    tag: str | None = None
    queue: str | None = None
    created_after: dt.datetime | None = None
    created_before: dt.datetime | None = None
    limit: int = 25
    #: The ID of the last run of the previous page.
    cursor: str | None = None
    #: Runs with any of these tags, in any of these queues.
    any_tags: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    batch_id: str | None = None
    schedule_id: str | None = None


def _has_tag(conn: sa.Connection, tag: str) -> Any:
    if conn.dialect.name == "postgresql":
        return runs.c.tags.op("@>")(sa.func.jsonb_build_array(tag))
    each = sa.func.json_each(runs.c.tags).table_valued("value")
    return sa.exists(sa.select(1).select_from(each).where(each.c.value == tag))


def query_conditions(conn: sa.Connection, project_id: str, query: RunQuery) -> list[Any]:
    """The WHERE conditions of ``query``'s filters (not its cursor)."""
    where = [runs.c.project_id == project_id]
    if query.statuses:
        where.append(runs.c.status.in_(query.statuses))
    if query.tasks:
        where.append(runs.c.task.in_(query.tasks))
    if query.tag:
        where.append(_has_tag(conn, query.tag))
    if query.queue:
        where.append(runs.c.queue == query.queue)
    if query.any_tags:
        where.append(sa.or_(*(_has_tag(conn, tag) for tag in query.any_tags)))
    if query.queues:
        where.append(runs.c.queue.in_(query.queues))
    if query.batch_id:
        where.append(runs.c.batch_id == query.batch_id)
    if query.schedule_id:
        where.append(runs.c.schedule_id == query.schedule_id)
    if query.created_after:
        where.append(runs.c.created_at > query.created_after)
    if query.created_before:
        where.append(runs.c.created_at < query.created_before)
    return where


def list_runs(conn: sa.Connection, project_id: str, query: RunQuery) -> dict[str, Any]:
    """Newest first. IDs sort by creation time, so "older than the cursor" pages
    stay stable while new runs arrive."""
    where = query_conditions(conn, project_id, query)
    if query.cursor:
        where.append(runs.c.id < query.cursor)
    rows = [
        dict(r)
        for r in conn.execute(
            sa.select(runs).where(*where).order_by(runs.c.id.desc()).limit(query.limit + 1)
        ).mappings()
    ]
    page = rows[: query.limit]
    return {
        "data": [run_view(r, []) for r in page],
        "next_cursor": page[-1]["id"] if len(rows) > query.limit else None,
    }


def count_by_status(conn: sa.Connection, condition: Any) -> dict[str, int]:
    """How many runs matching ``condition`` are in each status (every status listed)."""
    counts = {s.value: 0 for s in RunStatus}
    for status, count in conn.execute(
        sa.select(runs.c.status, sa.func.count()).where(condition).group_by(runs.c.status)
    ):
        counts[status] = int(count)
    return counts


def batch_summary(conn: sa.Connection, project_id: str, batch_id: str) -> dict[str, Any] | None:
    batch = (
        conn.execute(
            sa.select(batches).where(batches.c.id == batch_id, batches.c.project_id == project_id)
        )
        .mappings()
        .first()
    )
    if batch is None:
        return None
    counts = count_by_status(conn, runs.c.batch_id == batch_id)
    run_ids = (
        conn.execute(sa.select(runs.c.id).where(runs.c.batch_id == batch_id).order_by(runs.c.id))
        .scalars()
        .all()
    )
    final = sum(counts[s.value] for s in RunStatus if s.is_final)
    return {
        "id": batch["id"],
        "count": batch["count"],
        "counts": counts,
        "is_final": final == batch["count"],
        "created_at": isoformat(batch["created_at"]),
        "run_ids": list(run_ids),
    }
