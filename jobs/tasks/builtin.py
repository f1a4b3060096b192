"""Built-in tasks for smoke tests and demos."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs.tasks.registry import TaskContext, task


@task("echo")
async def echo(payload: Any, ctx: TaskContext) -> Any:
    """Return the payload unchanged."""
    return payload


class SleepPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=1.0, ge=0, le=3600, description="How long to wait.")


class SleepOutput(BaseModel):
    #: Seconds it waited.
    slept: float


@task("sleep", payload=SleepPayload, output=SleepOutput)
async def sleep(payload: SleepPayload, ctx: TaskContext) -> dict[str, float]:
    """Wait ``seconds``, then return how long it waited."""
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}
