"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any

import orjson
import sqlalchemy as sa
from pydantic import AfterValidator
from sqlalchemy.dialects.postgresql import JSONB

__all__ = [
    "JSONColumn",
    "UTCDateTime",
    "UTCTime",
    "exact_loads",
    "isoformat",
    "json_text",
    "to_utc",
    "utcnow",
]

#: Nineteen digits in a row: maybe an integer past 64 bits, which orjson would
#: read as a float.
_LONG_DIGITS = re.compile(r"[0-9]{19}")


def json_text(value: Any) -> str:
    """A JSON column's text: orjson, or the standard library for what orjson
    has no form for (an integer past 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def exact_loads(text: str | bytes) -> Any:
    """A JSON column's value, numbers kept exact: orjson, unless an integer
    past 64 bits may be in it.

    :raises TypeError: not text (SQLite hands back a bare JSON number as a
        number, which SQLAlchemy's JSON type then takes as it is)
    """
    if isinstance(text, bytes):
        probe = text.decode()
    elif isinstance(text, str):
        probe = text
    else:
        raise TypeError(f"a JSON column held a {type(text).__name__}, not text")
    return json.loads(text) if _LONG_DIGITS.search(probe) else orjson.loads(text)


#: JSON on SQLite, JSONB on PostgreSQL.
JSONColumn = sa.JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def isoformat(value: dt.datetime | None) -> str | None:
    """``2026-11-26T09:30:49.457Z``: how the API writes every time."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_utc(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC (naive counts as UTC); :class:`ValueError` when the
    conversion leaves the calendar (``0001-01-01T00:00:00+23:59``)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("the time is out of range (years 1 to 9999, in UTC)") from None


#: A time the API takes: ISO-8601, stored in UTC.
UTCTime = Annotated[dt.datetime, AfterValidator(to_utc)]


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """An aware UTC datetime on every backend.

    SQLite has no time zones, so values are stored as naive UTC and given
    their zone back on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)
