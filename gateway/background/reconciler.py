"""The reconciler: puts back on the queue what the database says is due.

It also pumps every queue that holds runs (``gateway.queues.admission``) and resumes
bulk actions that stopped moving.

Redis holds only work in flight and can lose it (a flush, a restart without
its AOF). The database cannot: every QUEUED run and every pending delivery is
a row. Every ``RECONCILE_INTERVAL`` seconds one gateway process (a Redis lock
picks it) looks for rows that have waited longer than ``RECONCILE_GRACE`` and
whose arq job is gone, and enqueues the job again under the same ``_job_id``,
so a job that does exist is never doubled (arq refuses a duplicate ID).
The queries are bounded and use the ``(status, updated_at)`` and
``(status, next_attempt_at)`` indexes.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from arq import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from redis.exceptions import RedisError

from db.engine import Database
from db.models import Delivery, DeliveryStatus, Run, RunStatus
from db.statistics import analyze_grown
from db.types import UTCDateTime, utcnow
from gateway.background.periodic import Periodic
from gateway.metrics import RECONCILER_ACTIONS
from gateway.runs import timers
from gateway.runs.effects import Job
from gateway.runs.read import JOB_COLUMNS, run_job
from gateway.schedules import schedules as schedule_table
from gateway.services.queues import FlowService
from gateway.services.runs import RunService
from gateway.services.schedules import ScheduleService
from gateway.services.waitpoints import WaitpointService
from gateway.settings import Settings
from gateway.waitpoints import waitpoints as waitpoint_table
from jobs.protocol import delivery_job_id, run_job_id
from webhooks.dispatch import DeliveryDispatcher

__all__ = ["LostWorkers", "Reconciler", "Scheduler", "Statistics"]

log = logging.getLogger("gateway.reconciler")

runs = Run.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]

BATCH = 500
#: What arq adds to a job's timeout for its in-progress mark's TTL.
IN_PROGRESS_EXTRA = 10.0
#: Seconds between two warnings that no dispatcher takes the callbacks.
UNSENT_WARNING_EVERY = 60.0


def due_runs(conn: sa.Connection, before: dt.datetime) -> list[Job]:
    """The jobs of QUEUED runs that have waited past ``before``, built as every
    other path builds them (``run_job``: limits and priority included)."""
    rows = conn.execute(
        sa.select(*JOB_COLUMNS)
        .where(
            runs.c.status == RunStatus.QUEUED.value,
            runs.c.held.is_(False),
            runs.c.updated_at < before,
        )
        .order_by(runs.c.updated_at)
        .limit(BATCH)
    ).mappings()
    return [run_job(conn, dict(r)) for r in rows.all()]


def due_deliveries(
    conn: sa.Connection, before: dt.datetime, lease_expired: dt.datetime
) -> list[dict[str, Any]]:
    """Pending deliveries past their time, with no attempt out (or one out
    so long it is lost: the next attempt's ``prepare`` records it so)."""
    rows = conn.execute(
        sa.select(deliveries.c.id, deliveries.c.schedule_step)
        .where(
            deliveries.c.status == DeliveryStatus.PENDING.value,
            deliveries.c.next_attempt_at < before,
            sa.or_(deliveries.c.leased_at.is_(None), deliveries.c.leased_at < lease_expired),
        )
        .order_by(deliveries.c.next_attempt_at)
        .limit(BATCH)
    ).mappings()
    return [dict(r) for r in rows]


_NOW = sa.bindparam("now", type_=UTCDateTime())
_ANYTHING_DUE = sa.select(
    sa.or_(timers.due_now(_NOW), schedule_table.due_now(_NOW), waitpoint_table.due_now(_NOW))
)


def anything_due(conn: sa.Connection, now: dt.datetime) -> bool:
    """Whether the scheduler's pass has anything to do at ``now``: a run to
    release or expire, a schedule to fire, a waitpoint to end (one read)."""
    return bool(conn.scalar(_ANYTHING_DUE, {"now": now}))


class Reconciler(Periodic):
    name = "reconciler"

    def __init__(
        self,
        *,
        db: Database,
        redis: ArqRedis,
        runs: RunService,
        flow: FlowService,
        dispatcher: DeliveryDispatcher,
        settings: Settings,
    ) -> None:
        super().__init__(redis, settings.reconcile_interval)
        self.db = db
        self.runs = runs
        self.flow = flow
        self.dispatcher = dispatcher
        self.settings = settings
        self.grace = settings.reconcile_grace
        #: When the last warning that no dispatcher takes callbacks was logged.
        self._unsent_warned_at = 0.0

    async def _missing(self, job_ids: Sequence[str], *, results_count: bool = True) -> list[bool]:
        """For each job ID: is there no job, no running job (and, unless
        ``results_count`` is false, no result) for it?"""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                keys = [job_key_prefix + job_id, in_progress_key_prefix + job_id]
                if results_count:
                    keys.append(result_key_prefix + job_id)
                pipe.exists(*keys)
            counts = await pipe.execute()
        return [count == 0 for count in counts]

    async def _release_stale(self, job_ids: Sequence[str]) -> int:
        """Take off the in-progress marks of callback jobs that no worker can
        still be running: a worker killed (or cut off from Redis) between
        taking a job and finishing it leaves arq's mark on for the job's
        timeout and 10 s (75 s with the defaults), and no worker takes the
        job until then. A mark set longer ago than the attempt's lease
        (``WEBHOOK_TIMEOUT`` + ``RECONCILE_GRACE``) is such a one: taken off,
        the job, still queued, runs at once, and records the attempt it may
        have sent as lost first (``prepare``). The deliveries given here are
        past their lease already; a mark's age is read off its TTL."""
        if not job_ids:
            return 0
        marked_for = self.settings.delivery_job_timeout + IN_PROGRESS_EXTRA
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.pttl(in_progress_key_prefix + job_id)
            ttls = await pipe.execute()
        stale = [
            in_progress_key_prefix + job_id
            for job_id, ttl in zip(job_ids, ttls, strict=True)
            if ttl > 0 and marked_for - ttl / 1000 > self.dispatcher.lease_seconds
        ]
        if stale:
            await self.redis.delete(*stale)
            log.warning(
                "reconciler took the in-progress marks off %d callback job(s) that no "
                "worker finished: %s",
                len(stale),
                ", ".join(key.removeprefix(in_progress_key_prefix) for key in stale[:5]),
            )
        return len(stale)

    async def run_once(self) -> dict[str, int]:
        """One pass; returns how many runs and deliveries it queued again."""
        before = utcnow() - dt.timedelta(seconds=self.grace)
        requeued_runs = requeued_deliveries = 0
        try:
            due = await self.db.read(due_runs, before)
            job_ids = [run_job_id(job.run_id, job.attempt, job.step) for job in due]
            lost_jobs = [
                job
                for job, missing in zip(due, await self._missing(job_ids), strict=True)
                if missing
            ]
            if lost_jobs and await self.runs.units.enqueue_many(lost_jobs):
                requeued_runs += len(lost_jobs)
            # A due delivery whose job is gone, or over without moving the
            # delivery on (arq keeps a result even for a job whose data
            # vanished): queue it again, with the stale result out of the way.
            now = utcnow()
            pending = (
                []  # ``gateway dispatch`` reads what is due from the database itself
                if self.dispatcher.settings.webhook_dispatcher
                else await self.db.read(
                    due_deliveries,
                    before,
                    now - dt.timedelta(seconds=self.dispatcher.lease_seconds),
                )
            )
            job_ids = [delivery_job_id(d["id"], d["schedule_step"]) for d in pending]
            gone_flags = await self._missing(job_ids, results_count=False)
            for delivery, job, gone in zip(pending, job_ids, gone_flags, strict=True):
                if gone:
                    await self.redis.delete(result_key_prefix + job)
                    await self.dispatcher.requeue(delivery["id"], step=delivery["schedule_step"])
                    requeued_deliveries += 1
            released = await self._release_stale(
                [job for job, gone in zip(job_ids, gone_flags, strict=True) if not gone]
            )
            # Held runs whose queue has room (a pump that a crash kept from
            # running, a slot freed by a run of a queue gated after it
            # started), and bulk actions whose process went away.
            pumped = await self.flow.pump_queues()
            await self.flow.resume_bulks(self.grace)
            if self.settings.webhook_dispatcher:
                await self._warn_if_no_dispatcher()
        except (RedisError, OSError) as exc:
            log.warning("reconciler cannot reach Redis: %s", exc)
            pumped = released = 0
        for action, count in (
            ("requeued_run", requeued_runs),
            ("requeued_delivery", requeued_deliveries),
            ("released_delivery", released),
            ("pumped_run", pumped),
        ):
            if count:
                RECONCILER_ACTIONS.labels(action=action).inc(count)
        if requeued_runs or requeued_deliveries:
            log.warning(
                "reconciler queued again %d run(s) and %d delivery(ies) whose jobs were lost",
                requeued_runs,
                requeued_deliveries,
            )
        return {"runs": requeued_runs, "deliveries": requeued_deliveries}

    async def _warn_if_no_dispatcher(self) -> None:
        """Callbacks handed over longer ago than an attempt's lease: no
        ``gateway dispatch`` is taking them (none started, or all down). Said
        once a minute while it lasts; they go out once one runs."""
        count, waited = await self.dispatcher.handover_backlog()
        if waited <= self.dispatcher.lease_seconds:
            self._unsent_warned_at = 0.0  # taken again: a new wait warns at once
            return
        now = time.monotonic()
        if now - self._unsent_warned_at < UNSENT_WARNING_EVERY:
            return
        self._unsent_warned_at = now
        log.warning(
            "%d callback(s) wait for a dispatcher, the oldest for %.0f s: is `gateway "
            "dispatch` running? (or set WEBHOOK_DISPATCHER=false for the gateway and the "
            "workers, and the workers send them)",
            count,
            waited,
        )


class LostWorkers(Periodic):
    """Ends the attempts of workers that went silent (``worker_lost``, retried),
    every fifth of ``HEARTBEAT_TIMEOUT``: with the defaults (a heartbeat every
    2 s, 10 s of silence) a killed worker's runs start again within about 12 s,
    while a live worker, however busy, has missed four heartbeats first."""

    name = "lost-workers"

    def __init__(self, *, redis: ArqRedis, runs: RunService, settings: Settings) -> None:
        super().__init__(redis, max(0.1, settings.heartbeat_timeout / 5))
        self.runs = runs

    async def run_once(self) -> int:
        try:
            lost = await self.runs.recover_lost()
        except (RedisError, OSError) as exc:
            log.warning("cannot look for lost workers: Redis does not answer: %s", exc)
            return 0
        if lost:
            RECONCILER_ACTIONS.labels(action="lost_attempt").inc(lost)
            log.warning("%d attempt(s) lost with their worker; retried where attempts remain", lost)
        return lost


class Scheduler(Periodic):
    """Starts DELAYED and RETRYING runs when due, expires runs past their TTL,
    makes the runs of schedules whose tick has come, and ends waitpoints whose
    time has come (delays complete, waits time out)."""

    name = "scheduler"

    def __init__(
        self,
        *,
        redis: ArqRedis,
        runs: RunService,
        schedules: ScheduleService,
        waitpoints: WaitpointService,
        settings: Settings,
    ) -> None:
        super().__init__(redis, settings.scheduler_interval)
        self.runs = runs
        self.schedules = schedules
        self.waitpoints = waitpoints

    async def run_once(self) -> int:
        # One read first: an idle pass opens no write transaction (on SQLite
        # each would take the one write lock, every SCHEDULER_INTERVAL).
        if not await self.runs.db.read(anything_due, utcnow()):
            return 0
        done = (
            await self.runs.release_due()
            + await self.schedules.fire_schedules()
            + await self.waitpoints.end_due_waitpoints()
        )
        if done:
            RECONCILER_ACTIONS.labels(action="released_or_expired").inc(done)
        return done


class Statistics(Periodic):
    """PostgreSQL: analyzes each table that has grown to twice the size its
    statistics say (``db.statistics.analyze_grown``), every
    ``STATISTICS_INTERVAL``, so a young database under load stops reading
    whole tables through plans made while they were empty."""

    name = "statistics"

    def __init__(self, *, redis: ArqRedis, db: Database) -> None:
        super().__init__(redis, STATISTICS_INTERVAL)
        self.db = db

    async def start(self) -> None:
        if not self.db.is_sqlite:  # SQLite plans each statement anew
            await super().start()

    async def run_once(self) -> list[str]:
        analyzed = await self.db.maintain(analyze_grown)
        if analyzed:
            log.info("analyzed %s: grown to twice their statistics", ", ".join(analyzed))
        return analyzed


#: Seconds between two looks at the tables' sizes (one catalog read).
STATISTICS_INTERVAL = 2.0
