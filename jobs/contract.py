"""The arq jobs the gateway and the worker exchange: each job's name and
argument shape, declared once, imported by both sides.

A job travels as arq's function name and keyword arguments (never a
positional tuple whose order two modules must agree on). Each class below is
one job: :attr:`name` is the function the worker registers, and
:meth:`kwargs` what the job carries. The worker's functions take the same
names as parameters, so a new field with a default reaches an old worker as
an unknown keyword only if both sides forget this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jobs.protocol import delivery_job_id, run_job_id

__all__ = ["DeliverReport", "DeliverWebhook", "Job", "RunTask"]


@dataclasses.dataclass(frozen=True)
class Job:
    """A job's name (``name``, the worker's registered function) and fields."""

    name: ClassVar[str]

    def kwargs(self) -> dict[str, Any]:
        """The job's arguments, by name, as arq stores them."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class RunTask(Job):
    """One attempt of one run, or one step of a workflow (``jobs.runs.attempt.run_task``)."""

    name: ClassVar[str] = "run_task"

    run_id: str
    task: str
    payload: Any
    attempt: int = 1
    step: int = 0
    #: A workflow's node states, as the step finds them.
    state: dict[str, Any] | None = None
    #: What the worker enforces itself (``max_duration``).
    options: dict[str, Any] | None = None

    @property
    def job_id(self) -> str:
        """The arq ``_job_id``: one job per attempt and step."""
        return run_job_id(self.run_id, self.attempt, self.step)


@dataclasses.dataclass(frozen=True)
class DeliverWebhook(Job):
    """One attempt at one callback (``jobs.deliver.deliver_webhook``)."""

    name: ClassVar[str] = "deliver_webhook"

    delivery_id: str
    #: ``schedule`` (an attempt of the retry schedule) or ``resend``.
    trigger: str = "schedule"
    #: The signed request, when the gateway prepared it as it queued the job.
    prepared: dict[str, Any] | None = None
    #: The job was queued again after it vanished: an attempt may be out.
    retried: bool = False

    def scheduled_job_id(self, step: int) -> str:
        """The arq ``_job_id`` of the attempt at ``step`` of the schedule."""
        return delivery_job_id(self.delivery_id, step)


@dataclasses.dataclass(frozen=True)
class DeliverReport(Job):
    """One more try of a report the gateway has not heard (``jobs.report.deliver_report``)."""

    name: ClassVar[str] = "deliver_report"

    event: dict[str, Any]
