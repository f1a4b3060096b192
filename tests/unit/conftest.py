"""What the unit tests share: an in-memory SQLite database with the schema, and
a way to run a unit of work in a transaction of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import StaticPool
from sqlmodel import SQLModel

from db.models import Project
from db.types import utcnow

T = TypeVar("T")
PROJECT = "proj_test"


@pytest.fixture
def engine() -> Iterator[sa.Engine]:
    made = sa.create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    SQLModel.metadata.create_all(made)
    with made.begin() as conn:
        conn.execute(
            Project.__table__.insert(),  # type: ignore[attr-defined]
            {"id": PROJECT, "name": "unit", "created_at": utcnow()},
        )
    yield made
    made.dispose()


@pytest.fixture
def unit(engine: sa.Engine) -> Callable[..., Any]:
    """Run ``fn(conn, *args)`` in a transaction of its own, as ``Database.write`` does."""

    def run(fn: Callable[..., T], *args: Any) -> T:
        with engine.begin() as conn:
            return fn(conn, *args)

    return run
