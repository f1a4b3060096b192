"""One statement for many rows, sent to SQLite's driver with the rows as its
types would send them, for a fraction of what SQLAlchemy spends on each row.

``conn.execute(statement, rows)`` builds a dictionary of every parameter for
each row and then runs each value through its type's processor: on the report
path that was about half of an ``executemany``'s time, and the write lock is
held throughout (docs/performance.md). :func:`execute_many` compiles the
statement once per shape of row, keeps the order of its parameters and their
processors, and turns each row into the driver's tuple directly; a value that
repeats across the rows (the batch's ``now``) is processed once. A statement
this cannot send as SQLAlchemy would (a Python-side default, an expanding or
literal parameter, RETURNING) goes through ``conn.execute`` as before, and so
does every statement on PostgreSQL, where a set goes as arrays in one
statement anyway.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

__all__ = ["execute_many"]

_Plan = tuple[str, tuple[tuple[str, Callable[[Any], Any] | None, Any], ...]]
#: Not in a row: the parameter takes the value the statement gives it.
_ABSENT = object()


@functools.lru_cache(maxsize=256)
def _plan(dialect: sa.Dialect, statement: sa.Executable, keys: tuple[str, ...]) -> _Plan | None:
    """The SQL, and for each of its positional parameters its name, processor
    and fixed value (``_ABSENT`` when a row gives it); ``None`` when the
    statement needs SQLAlchemy's own handling."""
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
    if (
        not compiled.positional
        or compiled.positiontup is None
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or compiled.effective_returning
    ):
        return None
    processors = compiled._bind_processors
    order = []
    for name in compiled.positiontup:
        if name in keys:
            fixed = _ABSENT
        else:
            bind = compiled.binds[name]
            if bind.required or bind.callable is not None:
                return None
            fixed = bind.effective_value
        order.append((name, processors.get(name), fixed))
    return compiled.string, tuple(order)


def execute_many(
    conn: sa.Connection, statement: sa.Executable, rows: Sequence[Mapping[str, Any]]
) -> int:
    """Run ``statement`` once for each of ``rows`` (each with the same keys),
    as ``conn.execute(statement, rows)`` would; the number of rows it matched.
    No rows, no statement (``conn.execute`` would run it once, without
    parameters)."""
    if not rows:
        return 0
    plan = (
        _plan(conn.dialect, statement, tuple(rows[0]))
        if len(rows) > 1 and conn.dialect.name == "sqlite"
        else None
    )
    if plan is None:
        return int(conn.execute(statement, list(rows)).rowcount)
    sql, order = plan
    seen: dict[tuple[str, dt.datetime], Any] = {}
    try:
        params = [_driver_row(row, order, seen) for row in rows]
    except KeyError:  # a row without a parameter: SQLAlchemy says which
        return int(conn.execute(statement, list(rows)).rowcount)
    return int(conn.exec_driver_sql(sql, params).rowcount)


def _driver_row(
    row: Mapping[str, Any],
    order: tuple[tuple[str, Callable[[Any], Any] | None, Any], ...],
    seen: dict[tuple[str, dt.datetime], Any],
) -> tuple[Any, ...]:
    values = []
    for name, process, fixed in order:
        raw = row[name] if fixed is _ABSENT else fixed
        if process is not None:
            if type(raw) is dt.datetime:  # the batch's ``now``: processed once
                key = (name, raw)
                if key not in seen:
                    seen[key] = process(raw)
                raw = seen[key]
            else:
                raw = process(raw)
        values.append(raw)
    return tuple(values)
