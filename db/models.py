"""SQLModel tables and the run status enum.

The Alembic migrations under ``db/migrations`` create exactly these tables;
``tests/test_migrations.py`` checks the two stay in step.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from db.types import JSONColumn, UTCDateTime, utcnow

__all__ = [
    "FINAL_STATUSES",
    "ApiKey",
    "Project",
    "Run",
    "RunAttempt",
    "RunStatus",
    "RunTransition",
]


class RunStatus(enum.StrEnum):
    """Where a run is in its life. See DESIGN.md, "Run statuses"."""

    DELAYED = "DELAYED"
    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    RETRYING = "RETRYING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.CANCELED,
        RunStatus.EXPIRED,
        RunStatus.TIMED_OUT,
    }
)


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(
        default=None,
        sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index),
    )


class Project(SQLModel, table=True):
    __tablename__ = "projects"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200, sa_column_kwargs={"unique": True}, nullable=False)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )


class ApiKey(SQLModel, table=True):
    """A secret API key; only the SHA-256 of the key is stored."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", index=True, max_length=40)
    key_hash: str = Field(max_length=64, sa_column_kwargs={"unique": True}, nullable=False)
    #: The first characters of the key, to tell keys apart in listings.
    prefix: str = Field(max_length=20)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    revoked_at: dt.datetime | None = _ts()


class Run(SQLModel, table=True):
    __tablename__ = "runs"
    __table_args__ = (
        sa.Index("ix_runs_project_created", "project_id", "created_at"),
        sa.Index("ix_runs_status_updated", "status", "updated_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    project_id: str = Field(foreign_key="projects.id", max_length=40)
    task: str = Field(max_length=200)
    status: str = Field(max_length=16)
    #: The number of the current (or last) attempt, from 1.
    attempt: int = Field(default=1)
    payload: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))
    output: Any = Field(default=None, sa_column=sa.Column(JSONColumn, nullable=True))
    error_code: str | None = Field(default=None, max_length=100)
    error_message: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    tags: list[str] = Field(default_factory=list, sa_column=sa.Column(JSONColumn, nullable=False))
    # ``metadata`` is taken by SQLAlchemy's declarative base, hence the name.
    meta: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column("metadata", JSONColumn, nullable=False)
    )
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
    started_at: dt.datetime | None = _ts()
    finished_at: dt.datetime | None = _ts()


class RunAttempt(SQLModel, table=True):
    """One execution attempt of a run."""

    __tablename__ = "run_attempts"
    __table_args__ = (sa.UniqueConstraint("run_id", "number", name="uq_run_attempts_run_number"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id", max_length=40)
    number: int
    status: str = Field(max_length=16)
    worker_id: str | None = Field(default=None, max_length=200)
    started_at: dt.datetime | None = _ts()
    finished_at: dt.datetime | None = _ts()
    error_code: str | None = Field(default=None, max_length=100)
    error_message: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))


class RunTransition(SQLModel, table=True):
    """Every status change a run went through, in order (an audit log)."""

    __tablename__ = "run_transitions"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id", index=True, max_length=40)
    from_status: str | None = Field(default=None, max_length=16)
    to_status: str = Field(max_length=16)
    attempt: int
    at: dt.datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False)
    )
