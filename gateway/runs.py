"""Runs: creating them, reading them, and applying the workers' reports.

Every change of a run's status goes through :meth:`RunService._transition`, a
compare-and-set that names the status and attempt it expects (DESIGN.md,
invariant 3), so a duplicate, late or replayed report changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from arq import ArqRedis
from redis.exceptions import RedisError

from db.engine import Database
from db.ids import new_id
from db.models import Run, RunAttempt, RunStatus, RunTransition
from db.types import isoformat, utcnow
from gateway.errors import NotFound
from gateway.notify import RunNotifier
from gateway.schemas import TriggerRequest, WorkerEvent
from gateway.settings import Settings
from gateway.webhooks import FINAL_EVENTS, Outgoing, WebhookService, create_run_deliveries

__all__ = ["EventOutcome", "RunService", "run_view"]

log = logging.getLogger("gateway.runs")

runs = Run.__table__  # type: ignore[attr-defined]
run_attempts = RunAttempt.__table__  # type: ignore[attr-defined]
run_transitions = RunTransition.__table__  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class EventOutcome:
    """The gateway's answer to a worker event.

    ``applied`` says whether it changed the run; ``proceed`` tells a worker
    that reported ``started`` whether to execute the task at all.
    """

    applied: bool
    status: str
    proceed: bool
    #: Deliveries committed with the transition, to queue after the commit.
    outgoing: tuple[Outgoing, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "status": self.status, "proceed": self.proceed}


def _error(code: str | None, message: str | None) -> dict[str, Any] | None:
    if code is None:
        return None
    return {"code": code, "message": message or ""}


def run_view(row: Mapping[str, Any], attempts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A run as the API shows it."""
    status = RunStatus(row["status"])
    started, finished = row["started_at"], row["finished_at"]
    duration_ms = None
    if started is not None and finished is not None:
        duration_ms = max(0, round((finished - started).total_seconds() * 1000))
    return {
        "id": row["id"],
        "task": row["task"],
        "status": status.value,
        "is_final": status.is_final,
        "payload": row["payload"],
        "output": row["output"],
        "error": _error(row["error_code"], row["error_message"]),
        "attempt": row["attempt"],
        "attempts": [
            {
                "number": a["number"],
                "status": a["status"],
                "worker_id": a["worker_id"],
                "started_at": isoformat(a["started_at"]),
                "finished_at": isoformat(a["finished_at"]),
                "error": _error(a["error_code"], a["error_message"]),
            }
            for a in attempts
        ],
        "tags": list(row["tags"] or []),
        "metadata": dict(row["metadata"] or {}),
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
        "started_at": isoformat(started),
        "finished_at": isoformat(finished),
        "duration_ms": duration_ms,
    }


class _LostRace(Exception):
    """Another gateway process applied a transition first; the caller retries."""


# -- units of work: each runs inside one transaction (see db.engine) -------


def _insert_run(conn: sa.Connection, row: Mapping[str, Any]) -> None:
    conn.execute(runs.insert(), dict(row))
    conn.execute(
        run_transitions.insert(),
        {
            "run_id": row["id"],
            "from_status": None,
            "to_status": row["status"],
            "attempt": row["attempt"],
            "at": row["created_at"],
        },
    )


def _load_run(conn: sa.Connection, project_id: str, run_id: str) -> dict[str, Any] | None:
    row = (
        conn.execute(sa.select(runs).where(runs.c.id == run_id, runs.c.project_id == project_id))
        .mappings()
        .first()
    )
    if row is None:
        return None
    attempts = (
        conn.execute(
            sa.select(run_attempts)
            .where(run_attempts.c.run_id == run_id)
            .order_by(run_attempts.c.number)
        )
        .mappings()
        .all()
    )
    return run_view(dict(row), [dict(a) for a in attempts])


def _transition(
    conn: sa.Connection,
    run_id: str,
    expected: RunStatus,
    to: RunStatus,
    attempt: int,
    now: dt.datetime,
    values: Mapping[str, Any],
) -> None:
    """Compare-and-set ``expected`` → ``to`` on the run and log the change."""
    result = conn.execute(
        runs.update()
        .where(runs.c.id == run_id, runs.c.status == expected.value, runs.c.attempt == attempt)
        .values(status=to.value, updated_at=now, **values)
    )
    if result.rowcount != 1:
        raise _LostRace(run_id)
    conn.execute(
        run_transitions.insert(),
        {
            "run_id": run_id,
            "from_status": expected.value,
            "to_status": to.value,
            "attempt": attempt,
            "at": now,
        },
    )


def _apply_started(
    conn: sa.Connection,
    event: WorkerEvent,
    run: Mapping[str, Any],
    same_attempt: bool,
    now: dt.datetime,
) -> EventOutcome:
    status = RunStatus(run["status"])
    outgoing: list[Outgoing] = []
    applied = same_attempt and status == RunStatus.QUEUED
    if applied:
        _transition(
            conn,
            event.run_id,
            status,
            RunStatus.EXECUTING,
            event.attempt,
            now,
            {"started_at": sa.func.coalesce(runs.c.started_at, now)},
        )
        conn.execute(
            run_attempts.insert(),
            {
                "run_id": event.run_id,
                "number": event.attempt,
                "status": RunStatus.EXECUTING.value,
                "worker_id": event.worker_id,
                "started_at": now,
            },
        )
        status = RunStatus.EXECUTING
        outgoing = create_run_deliveries(conn, run, lambda: _view(conn, run), "run.started", now)
    # A re-delivered job of the attempt that is running may go on (execution
    # is at-least-once); anything else must not run.
    proceed = same_attempt and status in (RunStatus.QUEUED, RunStatus.EXECUTING)
    return EventOutcome(
        applied=applied, status=status.value, proceed=proceed, outgoing=tuple(outgoing)
    )


def _apply_final(
    conn: sa.Connection,
    event: WorkerEvent,
    run: Mapping[str, Any],
    same_attempt: bool,
    now: dt.datetime,
) -> EventOutcome:
    status = RunStatus(run["status"])
    if not (same_attempt and status in (RunStatus.QUEUED, RunStatus.EXECUTING)):
        return EventOutcome(applied=False, status=status.value, proceed=False)
    values: dict[str, Any]
    if event.type == "completed":
        to, values = RunStatus.COMPLETED, {"output": event.output}
        code = message = None
    else:
        error = event.error
        code = error.code if error else "unknown_error"
        message = error.message if error else "the worker reported a failure without details"
        to, values = RunStatus.FAILED, {"error_code": code, "error_message": message}
    values.update(finished_at=now, started_at=sa.func.coalesce(runs.c.started_at, now))
    _transition(conn, event.run_id, status, to, event.attempt, now, values)
    attempt_values = {
        "status": to.value,
        "finished_at": now,
        "error_code": code,
        "error_message": message,
    }
    updated = conn.execute(
        run_attempts.update()
        .where(run_attempts.c.run_id == event.run_id, run_attempts.c.number == event.attempt)
        .values(**attempt_values)
    )
    if updated.rowcount == 0:  # the ``started`` report has not arrived (yet)
        conn.execute(
            run_attempts.insert(),
            {
                "run_id": event.run_id,
                "number": event.attempt,
                "worker_id": event.worker_id,
                "started_at": now,
                **attempt_values,
            },
        )
    outgoing = create_run_deliveries(conn, run, lambda: _view(conn, run), FINAL_EVENTS[to], now)
    return EventOutcome(applied=True, status=to.value, proceed=False, outgoing=tuple(outgoing))


def _view(conn: sa.Connection, run: Mapping[str, Any]) -> dict[str, Any]:
    view = _load_run(conn, run["project_id"], run["id"])
    assert view is not None
    return view


def _apply_event(conn: sa.Connection, event: WorkerEvent) -> EventOutcome | None:
    """Apply one worker event; ``None`` when the run does not exist."""
    current = (
        conn.execute(
            sa.select(
                runs.c.id,
                runs.c.project_id,
                runs.c.task,
                runs.c.status,
                runs.c.attempt,
                runs.c.callback_url,
            ).where(runs.c.id == event.run_id)
        )
        .mappings()
        .first()
    )
    if current is None:
        return None
    same_attempt, now = current["attempt"] == event.attempt, utcnow()
    if event.type == "started":
        return _apply_started(conn, event, dict(current), same_attempt, now)
    return _apply_final(conn, event, dict(current), same_attempt, now)


class RunService:
    def __init__(
        self,
        *,
        db: Database,
        redis: ArqRedis,
        notifier: RunNotifier,
        webhooks: WebhookService,
        settings: Settings,
    ) -> None:
        self.db = db
        self.redis = redis
        self.notifier = notifier
        self.webhooks = webhooks
        self.settings = settings

    async def trigger(self, project_id: str, task: str, request: TriggerRequest) -> dict[str, Any]:
        """Commit a QUEUED run, then enqueue its job (invariant 1)."""
        now = utcnow()
        row: dict[str, Any] = {
            "id": new_id("run"),
            "project_id": project_id,
            "task": task,
            "status": RunStatus.QUEUED.value,
            "attempt": 1,
            "payload": request.payload,
            "output": None,
            "error_code": None,
            "error_message": None,
            "tags": request.options.tags,
            "metadata": request.options.metadata,
            "created_at": now,
            "updated_at": now,
            "started_at": None,
            "finished_at": None,
            "callback_url": request.options.callback_url,
        }
        if row["callback_url"] is not None:
            self.webhooks.check_url(row["callback_url"], "options.callback_url")
        await self.db.write(_insert_run, row)
        await self.enqueue(row["id"], task, request.payload, attempt=1)
        return run_view(row, [])

    async def enqueue(self, run_id: str, task: str, payload: Any, *, attempt: int) -> bool:
        """Put the run's job on the queue; ``False`` if Redis did not take it.

        The run is committed already, so a failure here loses nothing: the
        reconciler enqueues it again (arq dedupes on ``_job_id``).
        """
        try:
            await self.redis.enqueue_job(
                "run_task",
                run_id,
                task,
                payload,
                attempt,
                _job_id=run_id if attempt == 1 else f"{run_id}:{attempt}",
                _queue_name=self.settings.queue_name,
            )
        except (RedisError, OSError) as exc:
            log.warning("could not enqueue %s (the reconciler will): %s", run_id, exc)
            return False
        return True

    async def get(self, project_id: str, run_id: str) -> dict[str, Any]:
        """The run, or :class:`NotFound` (also for another project's run)."""
        view = await self.db.read(_load_run, project_id, run_id)
        if view is None:
            raise NotFound(f"no run with id {run_id!r}", code="run_not_found")
        return view

    async def wait(self, project_id: str, run_id: str, seconds: float) -> dict[str, Any]:
        """The run once it is final, or as it is after ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        with self.notifier.watch(run_id) as changed:
            while True:
                changed.clear()
                view = await self.get(project_id, run_id)
                remaining = deadline - loop.time()
                if view["is_final"] or remaining <= 0:
                    return view
                try:
                    # Re-read now and then in case a notification was lost.
                    await asyncio.wait_for(changed.wait(), timeout=min(remaining, 5.0))
                except TimeoutError:
                    pass

    async def apply_event(self, event: WorkerEvent) -> EventOutcome:
        """Apply a verified worker event; a stale or repeated one is a no-op."""
        for _ in range(5):
            try:
                outcome = await self.db.write(_apply_event, event)
            except _LostRace:
                continue  # another process moved the run on: look again
            if outcome is None:
                raise NotFound(f"no run with id {event.run_id!r}", code="run_not_found")
            if outcome.applied:
                await self.notifier.publish(event.run_id)
            if outcome.outgoing:
                await self.webhooks.dispatch(outcome.outgoing)
            return outcome
        raise RuntimeError(f"run {event.run_id} kept changing under event {event.type}")
