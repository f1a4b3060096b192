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
from collections.abc import Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from arq.constants import in_progress_key_prefix, result_key_prefix

from db.models import Run, RunStatus
from db.rows import owned_row
from db.types import utcnow
from gateway.auth.tokens import WaitpointTokens
from gateway.errors import APIError, NotFound
from gateway.metrics import TRIGGER_GROUPS
from gateway.runlogs.logs import append_logs, list_logs
from gateway.runs.control import add_tags, cancel_run, update_metadata
from gateway.runs.create import (
    NewRun,
    create_runs,
    new_run,
    replay_from_node,
    replay_row,
    reset_idempotency_key,
)
from gateway.runs.effects import Effects
from gateway.runs.errors import LostRace, RunNotFound
from gateway.runs.read import RunQuery, batch_summary, list_runs, load_run, status_of
from gateway.runs.recovery import queued_before, recover_lost
from gateway.runs.reports.one_by_one import EventAnswer, apply_event, apply_events
from gateway.runs.requests import (
    TriggerOptions,
    TriggerRequest,
)
from gateway.runs.timers import release_due, reschedule
from gateway.services.coalesce import Coalescer
from gateway.services.units import UnitRunner
from jobs.protocol import RunLogs, WorkerEvent
from webhooks.service import WebhookService

__all__ = ["RunService"]

log = logging.getLogger("gateway.runs")

runs = Run.__table__  # type: ignore[attr-defined]
T = TypeVar("T")

#: Reports of a batch applied in one transaction; the chunks commit side by
#: side. A chunk's common reports go as sets (``gateway.runs.reports.as_sets``), so
#: a larger chunk costs few more statements. On SQLite the chunks of a batch
#: commit in one group anyway (one writer), so a chunk is the whole of a usual
#: batch: each chunk's ten or so statements cost Python far more than
#: SQLite (chunks of 8: 1.2 to 1.4 ms of web CPU per run with a callback; of
#: 64: 0.9, docs/performance.md). On PostgreSQL, chunks of 32; a writer that
#: finds a batch's chunks waiting together runs them in one group (spreading
#: them over idle writers was no faster: they share the event loop,
#: docs/performance.md).
EVENT_CHUNK = {"sqlite": 64, "postgresql": 32}
#: Groups of triggers in flight at once (``gateway.services.coalesce``): on
#: SQLite one commits while the last one's jobs go to Redis; PostgreSQL
#: commits several side by side.
TRIGGER_LANES = {"sqlite": 2, "postgresql": 4}


class RunService:
    """Runs: triggering, reading, waiting, canceling, replaying, the workers'
    reports and the passes that keep runs moving (docs/architecture.md)."""

    def __init__(
        self,
        units: UnitRunner,
        *,
        webhooks: WebhookService,
        waitpoint_tokens: WaitpointTokens,
    ) -> None:
        #: What runs this service's units of work and their effects.
        self.units = units
        self.db = units.db
        self.settings = units.settings
        self.webhooks = webhooks
        self.waitpoint_tokens = waitpoint_tokens
        self._born = time.monotonic()
        #: Triggers with no key to claim, created together when they arrive together.
        self.triggers: Coalescer[NewRun, tuple[dict[str, Any], bool]] = Coalescer(
            self.create, lanes=TRIGGER_LANES[self.db.dialect], observe=TRIGGER_GROUPS.observe
        )

    def new_row(
        self,
        project_id: str,
        task: str,
        payload: Any,
        options: TriggerOptions,
        *,
        field: str = "options",
        replayed_from: str | None = None,
        traceparent: str | None = None,
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
            traceparent=traceparent,
        )

    async def create(
        self, new: list[NewRun], *, batch_id: str | None = None
    ) -> list[tuple[dict[str, Any], bool]]:
        """Commit the runs, then queue the jobs of those due now (invariant 1)."""
        if batch_id is not None:
            for item in new:
                item.row["batch_id"] = batch_id
        # A trigger with the same idempotency (or debounce) key may win the race: look again.
        created = await self.units.write_until_settled(create_runs, new, batch_id)
        for view, cached in created.runs:
            view["debounced"] = bool(view.get("debounced"))
            view["is_cached"] = cached and not view["debounced"]
        await self.units.enqueue_all(created.effects)
        return created.runs

    async def trigger(
        self,
        project_id: str,
        task: str,
        request: TriggerRequest,
        *,
        traceparent: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """One run: its view, and whether an idempotency key gave back an
        earlier one. ``traceparent``: the trigger request's span."""
        new = self.new_row(
            project_id, task, request.payload, request.options, traceparent=traceparent
        )
        if new.row.get("idempotency_key") or new.debounce is not None:
            [(view, cached)] = await self.create([new])
            return view, cached
        return await self.triggers.submit(new)

    async def get(self, project_id: str | None, run_id: str) -> dict[str, Any]:
        """The run, or :class:`NotFound` (also for another project's run)."""
        view = await self.db.read_latest(load_run, project_id, run_id)
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
        with self.units.notifier.watch(run_id) as watch:
            status = await self.db.read_latest(status_of, project_id, run_id)
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
                    status = await self.db.read_latest(status_of, project_id, run_id) or status
            return await self.get(project_id, run_id)

    async def cancel(self, project_id: str, run_id: str) -> dict[str, Any]:
        """Cancel a run that is not final (and a workflow's children with it);
        abort its job if a worker is running it."""
        await self.units.after(await self.units.write_until_settled(cancel_run, project_id, run_id))
        return await self.get(project_id, run_id)

    async def replay(
        self, project_id: str, run_id: str, from_node: str | None = None
    ) -> dict[str, Any]:
        """A new run of the same task, payload and options (and queue), with
        ``replayed_from``; with ``from_node``, a workflow's new run reuses the
        outputs of its nodes but that one and those after it."""
        if from_node is not None:
            created = await self.units.write_until_settled(
                replay_from_node, project_id, run_id, from_node, utcnow()
            )
            await self.units.enqueue_all(created.effects)
            [(view, _)] = created.runs
            return view
        original = await self.db.read(_replay_source, project_id, run_id)
        [(view, _)] = await self.create([NewRun(replay_row(original, utcnow()))])
        return view

    async def reschedule(
        self, project_id: str, run_id: str, delay: float | dt.datetime
    ) -> dict[str, Any]:
        now = utcnow()
        run_at = delay if isinstance(delay, dt.datetime) else now + dt.timedelta(seconds=delay)
        await self.db.write(reschedule, project_id, run_id, max(run_at, now))
        return await self.get(project_id, run_id)

    async def add_tags(self, project_id: str, run_id: str, tags: list[str]) -> list[str]:
        """Add tags to a run (each once); its tags after."""
        return await self.db.write(add_tags, project_id, run_id, tags)

    async def update_metadata(
        self,
        project_id: str,
        run_id: str,
        replace: dict[str, Any] | None,
        operations: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """Replace and change a run's metadata; the metadata after."""
        return await self.db.write(update_metadata, project_id, run_id, replace, operations)

    async def reset_idempotency_key(self, project_id: str, task: str, key: str) -> None:
        """Forget the key: the next trigger of ``task`` with it makes a new run.

        :raises NotFound: the project's task has no such key (``idempotency_key_not_found``)
        """
        if not await self.db.write(reset_idempotency_key, project_id, task, key):
            raise NotFound(
                f"task {task!r} has no idempotency key {key!r}",
                code="idempotency_key_not_found",
            )

    async def find(self, project_id: str, query: RunQuery) -> dict[str, Any]:
        return await self.db.read(list_runs, project_id, query)

    async def batch(self, project_id: str, batch_id: str) -> dict[str, Any]:
        found = await self.db.read(batch_summary, project_id, batch_id)
        if found is None:
            raise NotFound(f"no batch with id {batch_id!r}", code="batch_not_found")
        return found

    def _node_urls(self, view: dict[str, Any]) -> dict[str, Any]:
        for node in (view.get("nodes") or {}).values():
            if node.get("waitpoint"):
                node["waitpoint"]["url"] = self.waitpoint_tokens.url_of(node["waitpoint"]["id"])
        return view

    # Run logs.

    async def append_logs(self, batches: Sequence[RunLogs]) -> list[APIError | None]:
        """Keep log batches (one transaction; each alone if one is refused);
        for each, ``None`` or the error that refused it. Wakes the runs' waiters."""
        cap = self.settings.run_log_max_lines
        answers: list[APIError | None] = [None] * len(batches)
        try:
            changed = await self.db.write_behind(append_logs, batches, cap, utcnow())
        except APIError:
            changed = []
            for i, batch in enumerate(batches):
                try:
                    changed += await self.db.write_behind(append_logs, [batch], cap, utcnow())
                except APIError as exc:
                    answers[i] = exc
        for run_id in dict.fromkeys(changed):
            await self.units.notifier.publish(run_id, final=False)
        return answers

    async def logs(
        self, project_id: str | None, run_id: str, limit: int, cursor: int | None
    ) -> dict[str, Any]:
        return await self.db.read(list_logs, project_id, run_id, limit, cursor)

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
            async with self.units.redis.pipeline(transaction=False) as pipe:
                for _, queued_job in queued:
                    # Taken by a worker, or even finished (arq stores a
                    # result for a job whose data vanished in a flush), yet
                    # the run never started as far as the database knows.
                    pipe.exists(in_progress_key_prefix + queued_job, result_key_prefix + queued_job)
                flags = await pipe.execute()
            taken = [run_id for (run_id, _), flag in zip(queued, flags, strict=True) if flag]
        lost = await self.units.write(recover_lost, now, timeout, taken)
        await self.units.after(lost)
        return len(lost.abort)

    async def release_due(self) -> int:
        """One scheduler pass: start due DELAYED/RETRYING runs, expire stale ones."""
        due = await self.units.write(release_due, utcnow())
        await self.units.after(due)
        return len(due.jobs) + len(due.abort)

    async def apply_event(self, event: WorkerEvent) -> EventAnswer:
        """Apply a verified worker event; a stale or repeated one is a no-op."""
        answer = await self.units.write_until_settled(apply_event, event)
        await self.units.after(answer.effects)
        return answer

    async def _apply_chunk(
        self, events: Sequence[WorkerEvent]
    ) -> list[EventAnswer | APIError | LostRace]:
        try:
            return await self.units.write_behind(apply_events, events)
        except (APIError, LostRace):  # rare: again, each report in a savepoint
            return await self.units.write_behind(apply_events, events, isolated=True)

    async def apply_events(self, events: Sequence[WorkerEvent]) -> list[EventAnswer | APIError]:
        """Apply a batch of verified worker events, then do what they set in
        motion together (one round trip for all their jobs).

        The batch goes in chunks of ``EVENT_CHUNK``, each a unit of its own
        (on PostgreSQL, a chunk takes a handful of round trips); one
        that lost a race runs again.
        """
        answers: list[EventAnswer | APIError | LostRace] = [LostRace()] * len(events)
        pending = list(range(len(events)))
        for _ in range(5):
            if not pending:
                break
            size = EVENT_CHUNK[self.db.dialect]
            chunks = [pending[i : i + size] for i in range(0, len(pending), size)]
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
        await self.units.after(effects)
        return out


def _replay_source(conn: sa.Connection, project_id: str, run_id: str) -> dict[str, Any]:
    return owned_row(conn, runs, run_id, project_id, RunNotFound(run_id))
