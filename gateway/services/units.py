"""What every service of ``gateway.runs`` does around a unit of work.

A unit runs in a transaction of its own (again when another process won a
race, :class:`LostRace`), then the queues it asked for are pumped in the same
transaction (``gateway.queues.admission.flowing``), and only after the commit are its
effects set in motion: jobs queued, callbacks dispatched, waiters woken,
workers asked to abort (``Effects``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from arq import ArqRedis
from arq.constants import abort_jobs_ss
from redis.exceptions import RedisError

from db.engine import Database
from gateway.metrics import observe_transition
from gateway.notify import RunNotifier
from gateway.queue import QueuedJob, enqueue_jobs
from gateway.queues.admission import Flowed, flowing
from gateway.runs.effects import Effects, Job
from gateway.runs.errors import LostRace
from gateway.settings import Settings
from jobs.contract import RunTask
from webhooks.dispatch import DeliveryDispatcher

__all__ = ["UnitRunner"]

log = logging.getLogger("gateway.runs")

T = TypeVar("T")


class UnitRunner:
    """Runs units of work and what they set in motion. One is shared by the
    services (``gateway.services``), each given it at construction."""

    def __init__(
        self,
        *,
        db: Database,
        redis: ArqRedis,
        notifier: RunNotifier,
        dispatcher: DeliveryDispatcher,
        settings: Settings,
    ) -> None:
        self.db = db
        self.redis = redis
        self.notifier = notifier
        self.dispatcher = dispatcher
        self.settings = settings

    def queued(self, job: Job) -> QueuedJob:
        """The arq job that runs ``job`` (``jobs.contract.RunTask``, under the
        run's job ID)."""
        task = RunTask(
            run_id=job.run_id,
            task=job.task,
            payload=job.payload,
            attempt=job.attempt,
            step=job.step,
            state=job.state,
            options=job.options,
        )
        return QueuedJob.of(
            task,
            job_id=task.job_id,
            queue_name=self.settings.queue_name,
            head_start=job.priority,
            fair_key=job.project_id,
        )

    async def enqueue(self, job: Job) -> bool:
        """Put a run's job on the queue; ``False`` if Redis did not take it.

        The run is committed already, so a failure here loses nothing: the
        reconciler enqueues it again (arq dedupes on ``_job_id``).
        """
        return await self.enqueue_all(Effects(jobs=[job]))

    async def enqueue_many(self, jobs: list[Job]) -> bool:
        """Put runs' jobs on the queue in one round trip; ``False`` if Redis
        did not take them (the reconciler tries again)."""
        return await self.enqueue_all(Effects(jobs=jobs))

    async def enqueue_all(self, effects: Effects) -> bool:
        """The runs' jobs and the callbacks' first attempts, in one round trip."""
        queued = [self.queued(job) for job in effects.jobs]
        queued += self.dispatcher.first_attempts(effects.outgoing)
        try:
            await enqueue_jobs(self.redis, queued)
            await self.dispatcher.hand_over(effects.outgoing)
        except (RedisError, OSError) as exc:
            # Committed already: the reconciler queues them again (arq dedupes).
            log.warning("could not queue %d job(s) (the reconciler will): %s", len(queued), exc)
            return False
        return True

    async def after(self, effects: Effects) -> None:
        """What a committed unit of work set in motion: aborts, jobs, wake-ups, callbacks."""
        if effects.abort:
            try:
                now_ms = int(time.time() * 1000)
                await self.redis.zadd(abort_jobs_ss, dict.fromkeys(effects.abort, now_ms))
            except (RedisError, OSError) as exc:
                # The database has the final status; a worker that starts or
                # finishes the job is told so and stops there.
                log.warning("could not ask workers to abort %s: %s", effects.abort, exc)
        if effects.jobs or effects.outgoing:
            await self.enqueue_all(effects)
        finished = set(effects.finished)
        for run_id in effects.changed:
            await self.notifier.publish(run_id, final=run_id in finished)

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``db.write(fn, …)``, then queue the runs that the queue pumps at the
        end of the unit handed out (``gateway.queues.admission.flowing``)."""
        return await self._write(self.db.write, fn, *args, **kwargs)

    async def write_behind(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """:meth:`write` in the lane behind the application's writes
        (``db.write_behind``): workers' reports."""
        return await self._write(self.db.write_behind, fn, *args, **kwargs)

    async def _write(
        self,
        write: Callable[..., Awaitable[Flowed[T]]],
        fn: Callable[..., T],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        flowed = await write(flowing(fn), *args, **kwargs)
        for observed in flowed.observed:  # committed: counted once
            observe_transition(*observed)
        if flowed.jobs:
            await self.enqueue_all(Effects(jobs=flowed.jobs))
        return flowed.result

    async def write_until_settled(self, fn: Callable[..., T], *args: Any, tries: int = 5) -> T:
        """``db.write(fn, …)``, run again when another process moved a run
        between its read and its compare-and-set (:class:`LostRace`)."""
        for _ in range(tries):
            try:
                return await self.write(fn, *args)
            except LostRace:
                continue
        raise RuntimeError(f"{fn.__name__} lost the race {tries} times in a row")
