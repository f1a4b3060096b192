"""Pydantic models of what the API takes in."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = ["TriggerOptions", "TriggerRequest", "WorkerError", "WorkerEvent"]

Tag = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class TriggerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[Tag] = Field(default_factory=list, max_length=10)
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: A one-off callback for this run, signed with the project's signing secret.
    callback_url: str | None = Field(default=None, min_length=1, max_length=2048)


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payload: Any = None
    options: TriggerOptions = Field(default_factory=TriggerOptions)


class WorkerError(BaseModel):
    code: str = Field(max_length=100)
    message: str
    retryable: bool = False


class ChildRun(BaseModel):
    """A node of a workflow that a step starts as a child run."""

    node_id: str = Field(min_length=1, max_length=200)
    task: str = Field(min_length=1, max_length=200)
    payload: Any = None


class WorkerEvent(BaseModel):
    """A signed report from a worker (see ``jobs.report``)."""

    type: Literal["started", "completed", "failed", "waiting"]
    run_id: str = Field(max_length=40)
    attempt: int = Field(ge=1)
    #: A workflow's step; 0 for every other run.
    step: int = Field(default=0, ge=0)
    worker_id: str | None = Field(default=None, max_length=200)
    occurred_at: str | None = None
    output: Any = None
    error: WorkerError | None = None
    #: ``waiting`` only: the children to start and the nodes' states.
    spawn: list[ChildRun] = Field(default_factory=list, max_length=200)
    nodes: dict[str, dict[str, Any]] = Field(default_factory=dict)
