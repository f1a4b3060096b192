"""The run service: runs the units of work on runs, then what they set in motion.

The units (and the compare-and-set rules) live beside it in ``gateway.runs``;
this service runs each in a transaction of its own, again when another process
won a race, and only after the commit queues the jobs, dispatches the
callbacks, wakes the waiters and asks workers to abort (``Effects``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from arq import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, result_key_prefix
from redis.exceptions import RedisError

from db.engine import Database
from db.models import Run, RunStatus
from db.types import utcnow
from gateway.auth.tokens import WaitpointTokens
from gateway.errors import APIError, NotFound
from gateway.notify import RunNotifier
from gateway.queue import QueuedJob, enqueue_jobs
from gateway.runs.bulk import bulk_page, create_bulk, load_bulk, unfinished_bulks
from gateway.runs.cancel import cancel_run
from gateway.runs.create import NewRun, create_runs, new_run, replay_from_node, replay_row
from gateway.runs.effects import Effects, Job
from gateway.runs.errors import LostRace, RunNotFound
from gateway.runs.events import EventAnswer, apply_event, apply_events
from gateway.runs.flow import flowing, pump_held
from gateway.runs.logs import append_logs, list_logs
from gateway.runs.options import (
    ScheduleCreate,
    ScheduleUpdate,
    TriggerOptions,
    TriggerRequest,
    WaitpointCreate,
)
from gateway.runs.queues import create_queue, get_queue, list_queues, update_queue
from gateway.runs.read import RunQuery, batch_summary, list_runs, load_run, status_of
from gateway.runs.recovery import queued_before, recover_lost
from gateway.runs.schedules import (
    check_schedule,
    create_schedule,
    delete_schedule,
    fire_due,
    get_schedule,
    list_schedules,
    update_schedule,
)
from gateway.runs.timers import release_due, reschedule
from gateway.runs.waitpoints import (
    complete_waitpoint,
    create_waitpoint,
    due_waitpoints,
    load_waitpoint,
)
from gateway.settings import Settings
from jobs.protocol import RunLogs, WorkerEvent, run_job_id
from webhooks.dispatch import DeliveryDispatcher
from webhooks.service import WebhookService

__all__ = ["RunService"]

log = logging.getLogger("gateway.runs")

runs = Run.__table__  # type: ignore[attr-defined]
T = TypeVar("T")

#: Reports of a batch applied in one transaction; the chunks commit side by side.
EVENT_CHUNK = 8


class RunService:
    def __init__(
        self,
        *,
        db: Database,
        redis: ArqRedis,
        notifier: RunNotifier,
        webhooks: WebhookService,
        dispatcher: DeliveryDispatcher,
        settings: Settings,
    ) -> None:
        self.db = db
        self.redis = redis
        self.notifier = notifier
        self.webhooks = webhooks
        self.dispatcher = dispatcher
        self.settings = settings
        self.waitpoint_tokens = WaitpointTokens(settings)
        self._born = time.monotonic()
        #: Bulk actions this process is doing, by ID.
        self._bulks: dict[str, asyncio.Task[None]] = {}

    def new_row(
        self,
        project_id: str,
        task: str,
        payload: Any,
        options: TriggerOptions,
        *,
        field: str = "options",
        replayed_from: str | None = None,
    ) -> NewRun:
        """The row of a new run, from a trigger's options (checked here)."""
        callback_url = options.callback_url
        if callback_url is not None:
            callback_url = self.webhooks.check_url(callback_url, f"{field}.callback_url")
        return new_run(
            project_id,
            task,
            payload,
            options,
            now=utcnow(),
            callback_url=callback_url,
            field=field,
            replayed_from=replayed_from,
        )

    async def create(
        self, new: list[NewRun], *, batch_id: str | None = None
    ) -> list[tuple[dict[str, Any], bool]]:
        """Commit the runs, then queue the jobs of those due now (invariant 1)."""
        if batch_id is not None:
            for item in new:
                item.row["batch_id"] = batch_id
        # A trigger with the same idempotency (or debounce) key may win the race: look again.
        created = await self._write_until_settled(create_runs, new, batch_id)
        for view, cached in created.runs:
            view["debounced"] = bool(view.get("debounced"))
            view["is_cached"] = cached and not view["debounced"]
        await self._enqueue_all(created.effects)
        return created.runs

    async def trigger(
        self, project_id: str, task: str, request: TriggerRequest
    ) -> tuple[dict[str, Any], bool]:
        """One run: its view, and whether an idempotency key gave back an earlier one."""
        [(view, cached)] = await self.create(
            [self.new_row(project_id, task, request.payload, request.options)]
        )
        return view, cached

    def queued(self, job: Job) -> QueuedJob:
        """The arq job that runs ``job`` (``run_task``, under the run's job ID)."""
        return QueuedJob(
            "run_task",
            (job.run_id, job.task, job.payload, job.attempt, job.step, job.state, job.options),
            run_job_id(job.run_id, job.attempt, job.step),
            self.settings.queue_name,
            head_start=job.priority,
        )

    async def enqueue(self, job: Job) -> bool:
        """Put a run's job on the queue; ``False`` if Redis did not take it.

        The run is committed already, so a failure here loses nothing: the
        reconciler enqueues it again (arq dedupes on ``_job_id``).
        """
        return await self._enqueue_all(Effects(jobs=[job]))

    async def _enqueue_all(self, effects: Effects) -> bool:
        """The runs' jobs and the callbacks' first attempts, in one round trip."""
        queued = [self.queued(job) for job in effects.jobs]
        queued += self.dispatcher.first_attempts(effects.outgoing)
        try:
            await enqueue_jobs(self.redis, queued)
        except (RedisError, OSError) as exc:
            # Committed already: the reconciler queues them again (arq dedupes).
            log.warning("could not queue %d job(s) (the reconciler will): %s", len(queued), exc)
            return False
        return True

    async def get(self, project_id: str | None, run_id: str) -> dict[str, Any]:
        """The run, or :class:`NotFound` (also for another project's run)."""
        view = await self.db.read(load_run, project_id, run_id)
        if view is None:
            raise RunNotFound(run_id)
        return self._node_urls(view)

    async def wait(self, project_id: str | None, run_id: str, seconds: float) -> dict[str, Any]:
        """The run once it is final, or as it is after ``seconds``.

        Meanwhile it reads one column, once: a notification says whether the
        run reached a final status, so the run is read whole only then (and
        its status again every 5 s, in case a notification was lost).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        with self.notifier.watch(run_id) as watch:
            status = await self.db.read(status_of, project_id, run_id)
            if status is None:
                raise RunNotFound(run_id)
            while not RunStatus(status).is_final and not watch.final:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                watch.changed.clear()
                try:
                    await asyncio.wait_for(watch.changed.wait(), timeout=min(remaining, 5.0))
                except TimeoutError:
                    status = await self.db.read(status_of, project_id, run_id) or status
            return await self.get(project_id, run_id)

    async def cancel(self, project_id: str, run_id: str) -> dict[str, Any]:
        """Cancel a run that is not final (and a workflow's children with it);
        abort its job if a worker is running it."""
        await self._after(await self._write_until_settled(cancel_run, project_id, run_id))
        return await self.get(project_id, run_id)

    async def replay(
        self, project_id: str, run_id: str, from_node: str | None = None
    ) -> dict[str, Any]:
        """A new run of the same task, payload and options (and queue), with
        ``replayed_from``; with ``from_node``, a workflow's new run reuses the
        outputs of its nodes but that one and those after it."""
        if from_node is not None:
            created = await self._write_until_settled(
                replay_from_node, project_id, run_id, from_node, utcnow()
            )
            await self._enqueue_all(created.effects)
            [(view, _)] = created.runs
            return view
        original = await self.db.read(_replay_source, project_id, run_id)
        if original is None:
            raise RunNotFound(run_id)
        [(view, _)] = await self.create([NewRun(replay_row(original, utcnow()))])
        return view

    async def reschedule(
        self, project_id: str, run_id: str, delay: float | dt.datetime
    ) -> dict[str, Any]:
        now = utcnow()
        run_at = delay if isinstance(delay, dt.datetime) else now + dt.timedelta(seconds=delay)
        await self.db.write(reschedule, project_id, run_id, max(run_at, now))
        return await self.get(project_id, run_id)

    async def find(self, project_id: str, query: RunQuery) -> dict[str, Any]:
        return await self.db.read(list_runs, project_id, query)

    async def batch(self, project_id: str, batch_id: str) -> dict[str, Any]:
        found = await self.db.read(batch_summary, project_id, batch_id)
        if found is None:
            raise NotFound(f"no batch with id {batch_id!r}", code="batch_not_found")
        return found

    # Schedules.

    async def create_schedule(self, project_id: str, body: ScheduleCreate) -> dict[str, Any]:
        """A schedule (its task and payload checked by the caller)."""
        check_schedule(body.cron, body.timezone, body.options)
        if body.options.callback_url is not None:
            body.options.callback_url = self.webhooks.check_url(
                body.options.callback_url, "options.callback_url"
            )
        return await self.db.write(
            create_schedule,
            project_id,
            body.task,
            body.cron,
            body.timezone,
            body.payload,
            body.options,
            body.enabled,
            utcnow(),
        )

    async def schedules(self, project_id: str) -> list[dict[str, Any]]:
        return await self.db.read(list_schedules, project_id)

    async def schedule(self, project_id: str, schedule_id: str) -> dict[str, Any]:
        return await self.db.read(get_schedule, project_id, schedule_id)

    async def update_schedule(
        self, project_id: str, schedule_id: str, body: ScheduleUpdate
    ) -> dict[str, Any]:
        current = await self.schedule(project_id, schedule_id)
        changes = body.changes()
        check_schedule(
            changes.get("cron", current["cron"]),
            changes.get("timezone", current["timezone"]),
            body.options,
        )
        if body.options is not None and body.options.callback_url is not None:
            body.options.callback_url = self.webhooks.check_url(
                body.options.callback_url, "options.callback_url"
            )
        return await self.db.write(update_schedule, project_id, schedule_id, changes, utcnow())

    async def delete_schedule(self, project_id: str, schedule_id: str) -> None:
        await self.db.write(delete_schedule, project_id, schedule_id)

    async def fire_schedules(self) -> int:
        """One scheduler pass over the schedules: a run for each that is due."""
        fired = await self._write(fire_due, utcnow())
        await self._after(fired)
        return len(fired.jobs)

    # Waitpoints.

    def _with_url(self, view: dict[str, Any]) -> dict[str, Any]:
        """A waitpoint's view with its signed URL (while it waits)."""
        view["url"] = (
            f"{self.settings.public_url}/api/v1/waitpoints/{view['id']}/callback/"
            f"{self.waitpoint_tokens.issue(view['id'])}"
            if view["status"] == "WAITING"
            else None
        )
        return view

    async def create_waitpoint(
        self, project_id: str, body: WaitpointCreate
    ) -> tuple[dict[str, Any], bool]:
        """A waitpoint (or the one its idempotency key made), with its URL."""
        view, cached = await self.db.write(
            create_waitpoint, project_id, body.timeout, body.idempotency_key, body.tags, utcnow()
        )
        return self._with_url(view), cached

    async def waitpoint(self, project_id: str, waitpoint_id: str) -> dict[str, Any]:
        return self._with_url(await self.db.read(load_waitpoint, project_id, waitpoint_id))

    async def complete_waitpoint(
        self, project_id: str | None, waitpoint_id: str, output: Any
    ) -> dict[str, Any]:
        """Complete a waitpoint (``project_id=None``: through its URL); the
        workflow waiting on it goes on."""
        view, effects = await self._write_until_settled(
            complete_waitpoint, project_id, waitpoint_id, output, utcnow()
        )
        await self._after(effects)
        return self._with_url(view)

    async def complete_waitpoint_by_url(self, token: str, output: Any) -> dict[str, Any]:
        return await self.complete_waitpoint(
            None, self.waitpoint_tokens.waitpoint_of(token), output
        )

    async def end_due_waitpoints(self) -> int:
        """One scheduler pass over waitpoints: delays due complete, waits past
        their timeout end TIMED_OUT."""
        ended = await self._write(due_waitpoints, utcnow())
        await self._after(ended)
        return len(ended.changed)

    def _node_urls(self, view: dict[str, Any]) -> dict[str, Any]:
        for node in (view.get("nodes") or {}).values():
            if node.get("waitpoint"):
                node["waitpoint"]["url"] = self._with_url(
                    {"id": node["waitpoint"]["id"], "status": "WAITING"}
                )["url"]
        return view

    # Run logs.

    async def append_logs(self, batches: Sequence[RunLogs]) -> list[APIError | None]:
        """Keep log batches (one transaction; each alone if one is refused);
        for each, ``None`` or the error that refused it. Wakes the runs' waiters."""
        cap = self.settings.run_log_max_lines
        answers: list[APIError | None] = [None] * len(batches)
        try:
            changed = await self.db.write(append_logs, batches, cap, utcnow())
        except APIError:
            changed = []
            for i, batch in enumerate(batches):
                try:
                    changed += await self.db.write(append_logs, [batch], cap, utcnow())
                except APIError as exc:
                    answers[i] = exc
        for run_id in dict.fromkeys(changed):
            await self.notifier.publish(run_id, final=False)
        return answers

    async def logs(
        self, project_id: str | None, run_id: str, limit: int, cursor: int | None
    ) -> dict[str, Any]:
        return await self.db.read(list_logs, project_id, run_id, limit, cursor)

    # Flow control and bulk actions.

    async def queues(self, project_id: str) -> list[dict[str, Any]]:
        return await self.db.read(list_queues, project_id)

    async def queue(self, project_id: str, name: str) -> dict[str, Any]:
        return await self.db.read(get_queue, project_id, name)

    async def create_queue(
        self, project_id: str, name: str, limit: int | None, paused: bool
    ) -> dict[str, Any]:
        return await self._write(create_queue, project_id, name, limit, paused)

    async def update_queue(
        self, project_id: str, name: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Change a queue's limit or pause it; a raised limit or a resume
        hands out held runs before this returns."""
        return await self._write(update_queue, project_id, name, changes)

    async def pump_queues(self) -> int:
        """Hand out what every queue with held runs has room for (the
        reconciler's pass; each unit that frees a slot does it too)."""
        jobs = await self.db.write(pump_held, utcnow())
        if jobs:
            await self._enqueue_all(Effects(jobs=jobs))
        return len(jobs)

    async def bulk(self, project_id: str, action: str, selection: dict[str, Any]) -> dict[str, Any]:
        """Record a bulk action and start doing it in pages, here in the background."""
        view = await self.db.write(create_bulk, project_id, action, selection, utcnow())
        if not view["is_final"]:
            self._drive(view["id"])
        return view

    async def bulk_status(self, project_id: str, bulk_id: str) -> dict[str, Any]:
        return await self.db.read(load_bulk, project_id, bulk_id)

    def _drive(self, bulk_id: str) -> None:
        if bulk_id in self._bulks:
            return
        task = asyncio.get_running_loop().create_task(self._drive_bulk(bulk_id))
        self._bulks[bulk_id] = task
        task.add_done_callback(lambda _: self._bulks.pop(bulk_id, None))

    async def _drive_bulk(self, bulk_id: str) -> None:
        try:
            while True:
                page = await self._write_until_settled(bulk_page, bulk_id, utcnow())
                await self._after(page.effects)
                if page.done:
                    return
        except Exception:  # the reconciler resumes it; the page did nothing twice
            log.exception("bulk action %s stopped; the reconciler resumes it", bulk_id)

    async def resume_bulks(self, grace: float) -> int:
        """Resume bulk actions that stopped moving (their process went away)."""
        stalled = await self.db.read(unfinished_bulks, utcnow() - dt.timedelta(seconds=grace))
        for bulk_id in stalled:
            self._drive(bulk_id)
        return len(stalled)

    async def recover_lost(self) -> int:
        """End attempts whose worker went silent (see ``transitions.recover_lost``).

        Only silence this process was up to hear counts: after a restart it
        waits a whole ``HEARTBEAT_TIMEOUT`` before judging, so workers that
        went on while every gateway was down have time to be heard.
        """
        timeout = self.settings.heartbeat_timeout
        if time.monotonic() - self._born < timeout:
            return 0
        now = utcnow()
        queued = await self.db.read(queued_before, now - dt.timedelta(seconds=timeout))
        taken: list[str] = []
        if queued:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, queued_job in queued:
                    # Taken by a worker, or even finished (arq stores a
                    # result for a job whose data vanished in a flush), yet
                    # the run never started as far as the database knows.
                    pipe.exists(in_progress_key_prefix + queued_job, result_key_prefix + queued_job)
                flags = await pipe.execute()
            taken = [run_id for (run_id, _), flag in zip(queued, flags, strict=True) if flag]
        lost = await self._write(recover_lost, now, timeout, taken)
        await self._after(lost)
        return len(lost.abort)

    async def release_due(self) -> int:
        """One scheduler pass: start due DELAYED/RETRYING runs, expire stale ones."""
        due = await self._write(release_due, utcnow())
        await self._after(due)
        return len(due.jobs) + len(due.abort)

    async def _after(self, effects: Effects) -> None:
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
            await self._enqueue_all(effects)
        finished = set(effects.finished)
        for run_id in effects.changed:
            await self.notifier.publish(run_id, final=run_id in finished)

    async def apply_event(self, event: WorkerEvent) -> EventAnswer:
        """Apply a verified worker event; a stale or repeated one is a no-op."""
        answer = await self._write_until_settled(apply_event, event)
        await self._after(answer.effects)
        return answer

    async def _apply_chunk(
        self, events: Sequence[WorkerEvent]
    ) -> list[EventAnswer | APIError | LostRace]:
        try:
            return await self._write(apply_events, events)
        except (APIError, LostRace):  # rare: again, each report in a savepoint
            return await self._write(apply_events, events, isolated=True)

    async def apply_events(self, events: Sequence[WorkerEvent]) -> list[EventAnswer | APIError]:
        """Apply a batch of verified worker events, then do what they set in
        motion together (one round trip for all their jobs).

        The batch goes in chunks of ``EVENT_CHUNK``, which commit side by side
        (on PostgreSQL each chunk's statements are round trips in a row); one
        that lost a race runs again.
        """
        answers: list[EventAnswer | APIError | LostRace] = [LostRace()] * len(events)
        pending = list(range(len(events)))
        for _ in range(5):
            if not pending:
                break
            chunks = [pending[i : i + EVENT_CHUNK] for i in range(0, len(pending), EVENT_CHUNK)]
            got = await asyncio.gather(
                *(self._apply_chunk([events[i] for i in chunk]) for chunk in chunks)
            )
            for chunk, chunk_answers in zip(chunks, got, strict=True):
                for index, answer in zip(chunk, chunk_answers, strict=True):
                    answers[index] = answer
            pending = [i for i in pending if isinstance(answers[i], LostRace)]
        effects = Effects()
        out: list[EventAnswer | APIError] = []
        for answer in answers:
            if isinstance(answer, LostRace):
                raise RuntimeError("an event lost the race 5 times in a row")
            if isinstance(answer, EventAnswer):
                effects.add(answer.effects)
            out.append(answer)
        await self._after(effects)
        return out

    async def _write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``db.write(fn, …)``, then queue the runs that the queue pumps at the
        end of the unit handed out (``gateway.runs.flow.flowing``)."""
        result, jobs = await self.db.write(flowing(fn), *args, **kwargs)
        if jobs:
            await self._enqueue_all(Effects(jobs=jobs))
        return result

    async def _write_until_settled(self, fn: Callable[..., T], *args: Any, tries: int = 5) -> T:
        """``db.write(fn, …)``, run again when another process moved a run
        between its read and its compare-and-set (:class:`LostRace`)."""
        for _ in range(tries):
            try:
                return await self._write(fn, *args)
            except LostRace:
                continue
        raise RuntimeError(f"{fn.__name__} lost the race {tries} times in a row")


def _replay_source(conn: sa.Connection, project_id: str, run_id: str) -> dict[str, Any] | None:
    row = (
        conn.execute(sa.select(runs).where(runs.c.id == run_id, runs.c.project_id == project_id))
        .mappings()
        .first()
    )
    return dict(row) if row is not None else None
