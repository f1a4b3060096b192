"""Cron expressions in a time zone: when a schedule's next tick is.

Five fields (minute precision), or six with a leading seconds field
(``*/5 * * * * *`` is every five seconds), read by croniter on the zone's wall
clock. The ticks are then put on the UTC line and kept strictly increasing: a
wall-clock time that a DST change skips runs once, at the jump (the first
instant after the gap), and one that it repeats (the hour that comes twice in
autumn) runs at its first occurrence only.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Callable

from croniter import CroniterError, croniter

__all__ = ["CronError", "check", "next_tick", "previous_tick", "zone"]


class CronError(ValueError):
    """An expression or a time zone that does not parse; the message says why."""


def zone(name: str) -> zoneinfo.ZoneInfo:
    """:raises CronError: not an IANA time zone name"""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(f"not an IANA time zone name (such as Europe/Berlin): {exc}") from None


def _seconds_first(expression: str) -> bool:
    return len(expression.split()) == 6


def check(expression: str) -> None:
    """:raises CronError: not five fields, or six with leading seconds, that croniter reads"""
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise CronError(
            f"a cron expression has 5 fields (minute hour day month weekday), or 6 with "
            f"leading seconds; this one has {len(fields)}"
        )
    if not croniter.is_valid(expression, second_at_beginning=_seconds_first(expression)):
        raise CronError(f"not a cron expression croniter reads: {expression!r}")
    # Fields that each parse may still never meet (``0 0 31 2 *``: February
    # has no 31st): such a schedule would never run.
    next_tick(expression, "UTC", dt.datetime.now(dt.UTC))


def _step(move: Callable[[type[dt.datetime]], dt.datetime], expression: str) -> dt.datetime:
    """croniter's next or previous time; croniter's "no such date" as a
    :class:`CronError`."""
    try:
        return move(dt.datetime)
    except CroniterError as exc:
        raise CronError(f"{expression!r} never matches a date: {exc}") from None


def _instant(wall: dt.datetime, where: zoneinfo.ZoneInfo) -> dt.datetime:
    """The UTC instant of a wall-clock time in ``where``: a repeated time's
    first occurrence (fold=0), and for a time the clock skips, the instant
    of the jump itself (02:30 on a spring-forward night at 02:00 runs at
    03:00, the first minute that exists)."""
    first = wall.replace(tzinfo=where, fold=0).astimezone(dt.UTC)
    if first.astimezone(where).replace(tzinfo=None) == wall:
        return first
    # Skipped: the jump lies between the two readings of the time (an hour
    # apart at most); find the instant the offset changes.
    low = wall.replace(tzinfo=where, fold=1).astimezone(dt.UTC)
    high = first
    if low > high:
        low, high = high, low
    before = low.astimezone(where).utcoffset()
    while high - low > dt.timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(where).utcoffset() == before:
            low = middle
        else:
            high = middle
    return high.replace(microsecond=0)


def next_tick(expression: str, tz: str, after: dt.datetime) -> dt.datetime:
    """The first tick strictly after ``after`` (aware), in UTC."""
    where = zone(tz)
    local = after.astimezone(where).replace(tzinfo=None)
    ticks = croniter(expression, local, second_at_beginning=_seconds_first(expression))
    for _ in range(1000):
        wall: dt.datetime = _step(ticks.get_next, expression)
        instant = _instant(wall, where)
        if instant > after:
            return instant
    raise CronError(f"{expression!r} has no tick after {after.isoformat()} in {tz}")


def previous_tick(expression: str, tz: str, at: dt.datetime) -> dt.datetime | None:
    """The latest tick at or before ``at`` (aware), in UTC; ``None`` if none
    is found within a year."""
    where = zone(tz)
    local = (at + dt.timedelta(seconds=1)).astimezone(where).replace(tzinfo=None)
    ticks = croniter(expression, local, second_at_beginning=_seconds_first(expression))
    for _ in range(10):
        try:
            wall: dt.datetime = _step(ticks.get_prev, expression)
        except CronError:
            return None
        instant = _instant(wall, where)
        if instant <= at:
            return instant
    return None
