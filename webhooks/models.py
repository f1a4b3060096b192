"""What the callback API takes in, and what a worker reports of an attempt."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from db.types import UTCTime
from jobs.protocol import clean_text
from webhooks.sender import ATTEMPT_ERROR_CODES

__all__ = [
    "ERROR_CODES",
    "DeliveryAttemptReport",
    "EndpointCreate",
    "EndpointUpdate",
    "RecoverRequest",
    "RotateRequest",
]

RESPONSE_EXCERPT_BYTES = 2048


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=20)
    tasks: list[str] = Field(default_factory=list, max_length=100)
    description: str = Field(default="", max_length=1000)


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    events: list[str] | None = Field(default=None, min_length=1, max_length=20)
    tasks: list[str] | None = Field(default=None, max_length=100)
    description: str | None = Field(default=None, max_length=1000)
    enabled: bool | None = None


class RotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period: float | None = Field(default=None, ge=0, le=7 * 24 * 3600)


class RecoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Messages created since this time.
    since: UTCTime
    #: Also send the messages still waiting for a retry at once (after the
    #: receiver is fixed), not only those that used up every retry.
    include_pending: bool = False


def _excerpt(value: Any) -> Any:
    return clean_text(value, RESPONSE_EXCERPT_BYTES) if isinstance(value, str) else value


def _message(value: Any) -> Any:
    return clean_text(value, 2000) if isinstance(value, str) else value


#: Codes of attempts that got no answer: the sender's, and the gateway's own.
ERROR_CODES = (
    *ATTEMPT_ERROR_CODES,
    "attempt_lost",  # the worker never reported the attempt (it died, or was refused)
    "record_failed",  # the answer could not be stored as it came
)


class DeliveryAttemptReport(BaseModel):
    """A worker's report of one attempt (a signed event of type ``delivery.attempt``).

    What the receiver sent back is text for a person: it is cleaned and cut
    here, never refused, so an attempt is always recorded.
    """

    type: str = Field(pattern="^delivery.attempt$")
    delivery_id: str = Field(max_length=40)
    key: str = Field(min_length=8, max_length=64)
    trigger: str = Field(pattern="^(schedule|resend)$")
    status_code: int | None = Field(default=None, ge=100, le=999)
    latency_ms: int | None = Field(default=None, ge=0)
    response_body: Annotated[str | None, BeforeValidator(_excerpt)] = None
    error: Annotated[str | None, BeforeValidator(_message)] = None
    error_code: str | None = Field(default=None, max_length=40)
    retry_after: float | None = Field(default=None, ge=0)

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300
