"""What a unit of work sets in motion, to do once its transaction has committed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from webhooks.outbox import Outgoing

__all__ = ["Effects", "EventAnswer", "Job", "job_of"]


@dataclasses.dataclass(frozen=True)
class Job:
    """A ``run_task`` job to queue once the transaction has committed."""

    run_id: str
    task: str
    payload: Any
    attempt: int = 1
    step: int = 0
    state: dict[str, Any] | None = None
    #: What the worker enforces itself (``max_duration``).
    options: dict[str, Any] | None = None
    #: Seconds of head start on arq's queue (``options.priority``).
    priority: int = 0
    #: Whose turn it takes on arq's queue (``gateway.queue``: fair across projects).
    project_id: str | None = None


def job_of(run: Mapping[str, Any], *, state: dict[str, Any] | None = None) -> Job:
    """The job that runs ``run``'s current attempt (and step)."""
    options: dict[str, Any] = {}
    if run.get("max_duration"):
        options["max_duration"] = run["max_duration"]
    if run.get("traceparent"):
        options["traceparent"] = run["traceparent"]
    return Job(
        run["id"],
        run["task"],
        run["payload"],
        run["attempt"],
        run.get("step", 0),
        state,
        options or None,
        run.get("priority") or 0,
        run.get("project_id"),
    )


@dataclasses.dataclass
class Effects:
    """Jobs to queue, callbacks to dispatch, runs whose waiters wake, and jobs
    workers should abort: never done inside the transaction, always after its
    commit (a job for an uncommitted run could start before the run exists)."""

    jobs: list[Job] = dataclasses.field(default_factory=list)
    outgoing: list[Outgoing] = dataclasses.field(default_factory=list)
    #: Runs whose waiters should wake (a run, and a parent it moved).
    changed: list[str] = dataclasses.field(default_factory=list)
    #: Those of them that reached a final status (a long-poll reads the run
    #: again only then).
    finished: list[str] = dataclasses.field(default_factory=list)
    #: arq job IDs workers should stop (canceled, expired or lost attempts).
    abort: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: Effects) -> Effects:
        """Take ``other``'s effects too; returns ``self``."""
        self.jobs.extend(other.jobs)
        self.outgoing.extend(other.outgoing)
        self.changed.extend(other.changed)
        self.finished.extend(other.finished)
        self.abort.extend(other.abort)
        return self

    def __bool__(self) -> bool:
        return bool(self.jobs or self.outgoing or self.changed or self.abort)


@dataclasses.dataclass(frozen=True)
class EventAnswer:
    """The gateway's answer to a worker's report, and what the report set in motion.

    ``applied`` says whether it changed the run; ``proceed`` tells a worker
    that reported ``started`` whether to execute the task at all.
    """

    applied: bool
    status: str
    proceed: bool
    effects: Effects = dataclasses.field(default_factory=Effects)

    def to_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "status": self.status, "proceed": self.proceed}
