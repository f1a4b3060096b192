"""A run's options as a trigger gives them (validated pydantic models), and the
requests that carry them: one trigger, a batch, a reschedule."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from db.types import to_utc

__all__ = [
    "BatchItem",
    "BatchRequest",
    "BulkFilter",
    "BulkRequest",
    "DebounceOptions",
    "QueueCreate",
    "QueueName",
    "QueueUpdate",
    "ReplayRequest",
    "RescheduleRequest",
    "RetryOptions",
    "ScheduleCreate",
    "ScheduleUpdate",
    "TriggerOptions",
    "TriggerRequest",
    "WaitpointComplete",
    "WaitpointCreate",
]

Tag = Annotated[str, StringConstraints(min_length=1, max_length=128)]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _seconds(value: Any) -> Any:
    """``30``, ``"30s"``, ``"10m"``, ``"1.5h"``, ``"2d"`` → seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("a duration is a number of seconds or a string like 30s, 10m, 2h, 1d")
        return float(match[1]) * _UNITS[match[2]]
    return value


#: Every duration the API takes is at most a year: past that it is a mistake
#: (and would overflow a date).
MAX_SECONDS = 365 * 24 * 3600.0
Duration = Annotated[float, BeforeValidator(_seconds), Field(ge=0, le=MAX_SECONDS)]


def _delay(value: Any) -> Any:
    """A delay in seconds (or a duration string), or an ISO-8601 time."""
    if isinstance(value, str) and not _DURATION.match(value):
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                "a delay is seconds, a duration like 10m, or an ISO-8601 time"
            ) from None
        return to_utc(when)
    return _seconds(value)


def _within_a_year(value: float | dt.datetime) -> float | dt.datetime:
    if isinstance(value, dt.datetime):
        if value > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=MAX_SECONDS):
            raise ValueError("a delay may reach at most a year ahead")
        return value
    if not 0 <= value <= MAX_SECONDS:
        raise ValueError("a delay is 0 to 31536000 seconds (a year)")
    return value


Delay = Annotated[float | dt.datetime, BeforeValidator(_delay), AfterValidator(_within_a_year)]


class RetryOptions(BaseModel):
    """Exponential backoff between attempts: ``min_delay * factor**(n-1)``, capped."""

    model_config = ConfigDict(extra="forbid")

    factor: float = Field(default=2.0, ge=1, le=10)
    min_delay: Duration = 1.0
    max_delay: Duration = 60.0
    #: Each delay moves by up to this fraction either way.
    jitter: float = Field(default=0.2, ge=0, le=1)


#: A queue's name: letters, digits and ``. _ : -``, as it appears in a URL path.
QueueName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")]
#: Seconds of head start a priority gives: at most a day.
MAX_PRIORITY = 86400
#: How long debounced triggers may push a run back, unless ``max_delay`` says.
DEFAULT_DEBOUNCE_MAX_DELAY = 3600.0


class DebounceOptions(BaseModel):
    """Triggers with the same ``key`` (per project and task) while the run they
    made is DELAYED give back that run and push its start to ``delay`` from
    now, up to ``max_delay`` after the first of them."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200)
    delay: Duration = Field(gt=0)
    #: ``leading``: the run keeps the first trigger's payload; ``trailing``:
    #: each trigger's payload (and tags and metadata) replaces it.
    mode: Literal["leading", "trailing"] = "leading"
    max_delay: Duration = Field(default=DEFAULT_DEBOUNCE_MAX_DELAY, gt=0)


class TriggerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[Tag] = Field(default_factory=list, max_length=10)
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: A one-off callback for this run, signed with the project's signing secret.
    callback_url: str | None = Field(default=None, min_length=1, max_length=2048)
    #: The same key (per project and task) within its TTL gives back the same run.
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    idempotency_key_ttl: Duration = Field(default=24 * 3600.0, le=30 * 24 * 3600)
    #: Start later: seconds (or ``"10m"``) from now, or an ISO-8601 time.
    delay: Delay | None = None
    #: A run not started within this many seconds ends EXPIRED.
    ttl: Duration | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=100)
    retry: RetryOptions = Field(default_factory=RetryOptions)
    #: Seconds one attempt may run; past it the run ends TIMED_OUT.
    max_duration: Duration | None = Field(default=None, gt=0)
    #: The queue whose concurrency limit the run obeys (default: the task's own).
    queue: QueueName | None = None
    #: The queue's limit applies to each key apart (a tenant, a customer).
    concurrency_key: str | None = Field(default=None, min_length=1, max_length=200)
    #: Seconds of head start: the run is ordered as if triggered this much earlier.
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY)
    debounce: DebounceOptions | None = None


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payload: Any = None
    options: TriggerOptions = Field(default_factory=TriggerOptions)


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200)
    payload: Any = None
    options: TriggerOptions = Field(default_factory=TriggerOptions)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] = Field(min_length=1, max_length=500)


class RescheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delay: Delay


#: A queue's concurrency limit: ``None`` is no limit (pause a queue to stop it).
#: Strict: ``true`` is no limit of 1, nor ``"5"`` one of five.
ConcurrencyLimit = Annotated[int, Field(ge=1, le=100_000, strict=True)]


class QueueCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: QueueName
    concurrency_limit: ConcurrencyLimit | None = None
    paused: bool = False


class QueueUpdate(BaseModel):
    """Only the fields given change; ``"concurrency_limit": null`` lifts the limit."""

    model_config = ConfigDict(extra="forbid")

    concurrency_limit: ConcurrencyLimit | None = None
    paused: bool | None = None

    def changes(self) -> dict[str, Any]:
        given = self.model_dump(include=self.model_fields_set)
        if given.get("paused") is None:
            given.pop("paused", None)
        return given


Status = Literal[
    "DELAYED",
    "QUEUED",
    "EXECUTING",
    "RETRYING",
    "WAITING",
    "COMPLETED",
    "FAILED",
    "CANCELED",
    "EXPIRED",
    "TIMED_OUT",
]


def _listed(value: Any) -> Any:
    """A single value as a list of one (``"status": "FAILED"``)."""
    return [value] if isinstance(value, str) else value


def _aware(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return to_utc(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            raise ValueError("an ISO-8601 time") from None
    return value


Time = Annotated[dt.datetime, BeforeValidator(_aware)]


class BulkFilter(BaseModel):
    """Runs that match every criterion given (at least one)."""

    model_config = ConfigDict(extra="forbid")

    status: Annotated[list[Status], BeforeValidator(_listed)] | None = None
    task: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=200)]],
            BeforeValidator(_listed),
        ]
        | None
    ) = None
    tag: Tag | None = None
    queue: QueueName | None = None
    created_after: Time | None = None
    created_before: Time | None = None


class BulkRequest(BaseModel):
    """``filter`` or ``ids``, one of them."""

    model_config = ConfigDict(extra="forbid")

    filter: BulkFilter | None = None
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=40)]] | None = Field(
        default=None, min_length=1, max_length=1000
    )

    def selection(self) -> dict[str, Any]:
        """What the action selects, as it is stored (times in ISO-8601)."""
        if self.ids is not None:
            return {"ids": sorted(set(self.ids))}
        assert self.filter is not None
        return {"filter": self.filter.model_dump(mode="json", exclude_none=True)}

    @model_validator(mode="after")
    def _one_of(self) -> BulkRequest:
        if (self.filter is None) == (self.ids is None):
            raise ValueError("give either filter or ids")
        if self.filter is not None and not self.filter.model_dump(exclude_none=True):
            raise ValueError("a filter needs at least one criterion (every run is not a filter)")
        return self


class ScheduleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200)
    #: Five fields, or six with leading seconds (``*/5 * * * * *``).
    cron: str = Field(min_length=1, max_length=200)
    #: An IANA time zone: the cron expression is read on its wall clock.
    timezone: str = Field(default="UTC", min_length=1, max_length=64)
    payload: Any = None
    #: Each run's options (no ``delay``, ``debounce`` or ``idempotency_key``:
    #: the tick is the run's time and its identity).
    options: TriggerOptions = Field(default_factory=TriggerOptions)
    enabled: bool = True
    #: Your own name for what the schedule is for (a user's ID), kept with it.
    external_id: str | None = Field(default=None, min_length=1, max_length=200)
    #: The same key (per project) changes the schedule that has it instead of
    #: making another, so a deploy that creates its schedules again is safe.
    deduplication_key: str | None = Field(default=None, min_length=1, max_length=200)


class ScheduleUpdate(BaseModel):
    """Only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: str | None = Field(default=None, min_length=1, max_length=64)
    payload: Any = None
    options: TriggerOptions | None = None
    enabled: bool | None = None
    external_id: str | None = Field(default=None, min_length=1, max_length=200)

    def changes(self) -> dict[str, Any]:
        given = {k: getattr(self, k) for k in self.model_fields_set}
        return {k: v for k, v in given.items() if v is not None or k == "payload"}


class TagsAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Added to the run's (each once); a run has at most 10.
    tags: list[Tag] = Field(min_length=1, max_length=10)


class MetadataUpdate(BaseModel):
    """A run's metadata replaced (``metadata``), then changed by each operation
    in order: ``{"type": "set"|"delete"|"append"|"remove"|"increment", "key",
    "value"}`` or ``{"type": "update", "value": {...}}`` (merged)."""

    model_config = ConfigDict(extra="ignore")

    metadata: dict[str, Any] | None = None
    operations: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)


class ReplayRequest(BaseModel):
    """``POST /api/v1/runs/{id}/replay``: an empty body replays the whole run."""

    model_config = ConfigDict(extra="forbid")

    #: A workflow's node: the replay reuses the outputs of every node its run
    #: completed but this one and those downstream of it, which run again.
    from_node: str | None = Field(default=None, min_length=1, max_length=200)


class WaitpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Past it the waitpoint ends TIMED_OUT (a ``wait`` node fails).
    timeout: Duration | None = Field(default=None, gt=0)
    #: The same key (per project) gives back the same waitpoint.
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    tags: list[Tag] = Field(default_factory=list, max_length=10)


class WaitpointComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output: Any = None
