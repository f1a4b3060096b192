"""Runs: creating them, reading them, and applying the workers' reports.

The units of work (and the compare-and-set rules) live in ``gateway.transitions``;
this service runs them, then queues what they set in motion.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq import ArqRedis
from arq.constants import abort_jobs_ss
from redis.exceptions import RedisError

from db.engine import Database
from db.ids import new_id
from db.models import RunStatus
from db.types import utcnow
from gateway.errors import Conflict, NotFound
from gateway.notify import RunNotifier
from gateway.schemas import TriggerRequest, WorkerEvent
from gateway.settings import Settings
from gateway.transitions import (
    WORKFLOW_TASK,
    EventOutcome,
    Job,
    LostRace,
    apply_event,
    cancel_run,
    insert_run,
    job_id,
    load_run,
    run_view,
)
from gateway.webhooks import WebhookService

__all__ = ["EventOutcome", "RunService", "run_view"]

log = logging.getLogger("gateway.runs")


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
            "step": 0,
            "step_pending": False,
            "parent_id": None,
            "node_id": None,
        }
        if row["callback_url"] is not None:
            self.webhooks.check_url(row["callback_url"], "options.callback_url")
        await self.db.write(insert_run, row)
        await self.enqueue(Job(row["id"], task, request.payload))
        return run_view(row, [], {} if task == WORKFLOW_TASK else None)

    async def enqueue(self, job: Job) -> bool:
        """Put a run's job on the queue; ``False`` if Redis did not take it.

        The run is committed already, so a failure here loses nothing: the
        reconciler enqueues it again (arq dedupes on ``_job_id``).
        """
        try:
            await self.redis.enqueue_job(
                "run_task",
                job.run_id,
                job.task,
                job.payload,
                job.attempt,
                job.step,
                job.state,
                _job_id=job_id(job.run_id, job.attempt, job.step),
                _queue_name=self.settings.queue_name,
            )
        except (RedisError, OSError) as exc:
            log.warning("could not enqueue %s (the reconciler will): %s", job.run_id, exc)
            return False
        return True

    async def get(self, project_id: str, run_id: str) -> dict[str, Any]:
        """The run, or :class:`NotFound` (also for another project's run)."""
        view = await self.db.read(load_run, project_id, run_id)
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

    async def cancel(self, project_id: str, run_id: str) -> dict[str, Any]:
        """Cancel a run that is not final (and a workflow's children with it);
        abort its job if a worker is running it."""
        for _ in range(5):
            try:
                result = await self.db.write(cancel_run, project_id, run_id)
            except LostRace:
                continue
            if result is None:
                raise NotFound(f"no run with id {run_id!r}", code="run_not_found")
            if isinstance(result, str):
                raise Conflict(
                    f"the run is {result} already; only a run that is not final can be canceled",
                    code="run_already_final",
                )
            if result.abort:
                try:
                    now_ms = int(time.time() * 1000)
                    await self.redis.zadd(abort_jobs_ss, dict.fromkeys(result.abort, now_ms))
                except (RedisError, OSError) as exc:
                    # The run is CANCELED in the database; a worker that starts
                    # or finishes it is told so and stops there.
                    log.warning("could not ask workers to abort %s: %s", run_id, exc)
            for job in result.jobs:
                await self.enqueue(job)
            for changed in result.changed:
                await self.notifier.publish(changed)
            if result.outgoing:
                await self.webhooks.dispatch(result.outgoing)
            return await self.get(project_id, run_id)
        raise RuntimeError(f"run {run_id} kept changing while being canceled")

    async def apply_event(self, event: WorkerEvent) -> EventOutcome:
        """Apply a verified worker event; a stale or repeated one is a no-op."""
        for _ in range(5):
            try:
                outcome = await self.db.write(apply_event, event)
            except LostRace:
                continue  # another process moved the run on: look again
            if outcome is None:
                raise NotFound(f"no run with id {event.run_id!r}", code="run_not_found")
            for job in outcome.jobs:
                await self.enqueue(job)
            for run_id in outcome.changed:
                await self.notifier.publish(run_id)
            if outcome.outgoing:
                await self.webhooks.dispatch(outcome.outgoing)
            return outcome
        raise RuntimeError(f"run {event.run_id} kept changing under event {event.type}")
