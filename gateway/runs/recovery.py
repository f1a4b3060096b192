"""Attempts whose worker went away: ended as ``worker_lost``, and retried.

A worker heartbeats while it runs an attempt. An attempt silent for
``HEARTBEAT_TIMEOUT``, or a job a worker took and never reported started, ends
as a retryable failure, so it runs again while attempts remain.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa

from db.models import RunStatus
from gateway.runs.effects import Effects
from gateway.runs.reports.one_by_one import apply_final
from gateway.runs.runs_table import ACTIVE, runs, select_run
from jobs.protocol import WorkerError, WorkerEvent, run_job_id

__all__ = ["LOST_CODE", "queued_before", "recover_lost"]

LOST_CODE = "worker_lost"


def recover_lost(
    conn: sa.Connection,
    now: dt.datetime,
    timeout: float,
    taken: Sequence[str] = (),
    limit: int = 100,
) -> Effects:
    """End attempts whose worker went away as failed with ``worker_lost``:
    retried if attempts remain, like any retryable failure, else the run fails.

    Two kinds: EXECUTING runs with no heartbeat for ``timeout`` seconds, and
    the QUEUED runs in ``taken``: their job was taken by a worker (arq's
    in-progress key) or is over (arq's result key; arq stores one for a job
    whose data vanished), and still no start was reported, nor a heartbeat
    for ``timeout`` since this pass first saw them taken.
    """
    done = Effects()
    silent = now - dt.timedelta(seconds=timeout)
    executing = (
        conn.execute(
            sa.select(runs.c.id)
            .where(
                runs.c.status == RunStatus.EXECUTING.value,
                sa.func.coalesce(runs.c.heartbeat_at, runs.c.updated_at) < silent,
            )
            .limit(limit)
        )
        .scalars()
        .all()
    )
    # Locked in ID order, as every unit that locks several runs does, so two
    # such units wait for each other instead of deadlocking.
    for run_id in sorted({*executing, *taken}):
        run = select_run(conn, run_id, lock=True)
        if run is None or run["status"] not in ACTIVE:
            continue
        times = conn.execute(
            sa.select(runs.c.heartbeat_at, runs.c.updated_at).where(runs.c.id == run_id)
        ).one()
        beat, since = times.heartbeat_at, times.updated_at
        if run["status"] == RunStatus.QUEUED.value and (beat is None or beat < since):
            # Taken, and no word yet since it was queued: it may have been
            # taken just now, after waiting its turn in the queue. The clock
            # starts here; its worker beats from the moment it takes a job.
            conn.execute(
                runs.update()
                .where(
                    runs.c.id == run_id,
                    runs.c.status == RunStatus.QUEUED.value,
                    runs.c.attempt == run["attempt"],
                )
                .values(heartbeat_at=now)
            )
            continue
        last_word = max(b for b in (beat, since) if b is not None) if since else beat
        if last_word is not None and last_word >= silent:
            continue
        event = WorkerEvent(
            type="failed",
            run_id=run_id,
            attempt=run["attempt"],
            step=run["step"],
            error=WorkerError(
                code=LOST_CODE,
                retryable=True,
                message=f"no word from the worker for {timeout:g} s",
            ),
        )
        done.abort.append(run_job_id(run_id, run["attempt"], run["step"]))
        done.add(apply_final(conn, event, run, now).effects)
    return done


def queued_before(
    conn: sa.Connection, before: dt.datetime, limit: int = 100
) -> list[tuple[str, str]]:
    """QUEUED runs unchanged since ``before``, with their current job IDs."""
    rows = conn.execute(
        sa.select(runs.c.id, runs.c.attempt, runs.c.step)
        .where(
            runs.c.status == RunStatus.QUEUED.value,
            runs.c.held.is_(False),
            runs.c.updated_at < before,
        )
        .order_by(runs.c.updated_at)
        .limit(limit)
    )
    return [(r.id, run_job_id(r.id, r.attempt, r.step)) for r in rows]
