"""``db.many.execute_many`` writes on SQLite exactly what ``conn.execute`` writes
for the same rows, matches the same rows, and hands what it cannot send
straight to the driver back to SQLAlchemy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from db.many import _plan, execute_many
from db.types import JSONColumn, UTCDateTime

metadata = sa.MetaData()
things = sa.Table(
    "things",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("at", UTCDateTime(), nullable=True),
    sa.Column("body", JSONColumn, nullable=True),
    sa.Column("flag", sa.Boolean, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
)
#: A Python-side default: SQLAlchemy computes it for each row.
stamped = sa.Table(
    "stamped",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False, default=7),
)

NOW = dt.datetime(2026, 12, 4, 3, 30, 1, 123456, tzinfo=dt.UTC)
LATER = NOW.astimezone(dt.timezone(dt.timedelta(hours=2))) + dt.timedelta(seconds=1)
ROWS: list[dict[str, Any]] = [
    {"id": "a", "at": NOW, "body": {"k": [1, "é"]}, "flag": True, "n": 1},
    {"id": "b", "at": NOW, "body": None, "flag": False, "n": 2},
    {"id": "c", "at": LATER, "body": [None], "flag": True, "n": 3},
    {"id": "d", "at": None, "body": "text", "flag": False, "n": 4},
]
#: A compare-and-set as ``gateway.runs.runs_table`` builds them: a literal in
#: the WHERE clause beside the row's own parameters.
BUMP = (
    things.update()
    .where(things.c.id == sa.bindparam("w_id"), things.c.flag == sa.true(), things.c.n < 100)
    .values(n=sa.bindparam("v_n"), at=sa.bindparam("v_at", type_=UTCDateTime()))
)


def _engine(path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    return engine


def _stored(engine: sa.Engine, table: sa.Table) -> list[tuple[Any, ...]]:
    """The rows as SQLite holds them (no type on the way out)."""
    with engine.connect() as conn:
        return list(conn.exec_driver_sql(f"SELECT * FROM {table.name} ORDER BY id"))


def test_rows_are_written_and_matched_as_sqlalchemy_does(tmp_path: Path) -> None:
    plain, fast = _engine(tmp_path / "plain.db"), _engine(tmp_path / "fast.db")
    bumps = [{"w_id": row["id"], "v_n": row["n"] * 10, "v_at": LATER} for row in ROWS]
    bumps.append({"w_id": "missing", "v_n": 0, "v_at": NOW})
    with plain.begin() as conn:
        conn.execute(things.insert(), ROWS)
        matched_plain = conn.execute(BUMP, bumps).rowcount
    with fast.begin() as conn:
        assert execute_many(conn, things.insert(), ROWS) == len(ROWS)
        matched_fast = execute_many(conn, BUMP, bumps)
    assert matched_fast == matched_plain == 2  # the two rows with the flag
    assert _stored(fast, things) == _stored(plain, things)
    assert _plan(fast.dialect, BUMP, tuple(bumps[0])) is not None  # went to the driver


def test_a_statement_with_a_python_default_goes_through_sqlalchemy(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "defaults.db")
    rows = [{"id": "x"}, {"id": "y"}]
    assert _plan(engine.dialect, stamped.insert(), ("id",)) is None
    with engine.begin() as conn:
        assert execute_many(conn, stamped.insert(), rows) == 2
        assert execute_many(conn, stamped.insert(), []) == 0  # no row: nothing runs
    assert _stored(engine, stamped) == [("x", 7), ("y", 7)]


def test_a_row_without_a_parameter_is_refused_by_sqlalchemy(tmp_path: Path) -> None:
    engine = _engine(tmp_path / "missing.db")
    with engine.begin() as conn, pytest.raises(sa.exc.StatementError, match="v_at"):
        execute_many(conn, BUMP, [{"w_id": "a", "v_n": 1, "v_at": NOW}, {"w_id": "b", "v_n": 2}])
