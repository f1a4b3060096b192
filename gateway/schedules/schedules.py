"""Schedules: a task's runs on a clock, one run per tick.

A schedule row holds its next tick. Each scheduler pass (one gateway process
at a time, ``gateway.background.reconciler.Scheduler``) takes the schedules that are due,
their rows locked and any another transaction holds passed over, makes one
run for each, with ``schedule_id`` and ``scheduled_at``, and moves the next
tick past now, in the same transaction. A unique index on ``(schedule_id,
scheduled_at)`` makes a second run of a tick impossible however many gateways
fire it. Ticks missed while nothing ran (every gateway down) make one run, for
the latest of them, not one each.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from db.engine import savepoint
from db.ids import new_id
from db.models import Schedule
from db.rows import owned_row
from db.types import isoformat
from gateway.errors import NotFound, ValidationFailed
from gateway.runs.create import NewRun, create_runs, new_run
from gateway.runs.effects import Effects
from gateway.runs.errors import LostRace
from gateway.runs.requests import TriggerOptions
from gateway.schedules.cron import CronError, check, next_tick, previous_tick, zone

__all__ = [
    "InvalidCron",
    "ScheduleNotFound",
    "check_schedule",
    "create_schedule",
    "delete_schedule",
    "due_now",
    "fire_due",
    "get_schedule",
    "list_schedules",
    "update_schedule",
]

schedules = Schedule.__table__  # type: ignore[attr-defined]

#: Options a schedule's runs cannot take: the tick is each run's time and identity.
_NOT_SCHEDULED = ("delay", "debounce", "idempotency_key")


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"

    def __init__(self, schedule_id: str) -> None:
        super().__init__(f"no schedule with id {schedule_id!r}")


class InvalidCron(ValidationFailed):
    """A cron expression that does not parse, or never matches a date."""

    code = "invalid_cron"


def check_schedule(cron: str, timezone: str, options: TriggerOptions | None) -> None:
    """:raises ValidationFailed: naming the cron expression, the time zone or an option"""
    details = []
    try:
        check(cron)
    except CronError as exc:
        details.append({"path": "cron", "type": "cron", "message": str(exc)})
    try:
        zone(timezone)
    except CronError as exc:
        details.append({"path": "timezone", "type": "timezone", "message": str(exc)})
    for name in _NOT_SCHEDULED:
        if options is not None and getattr(options, name) is not None:
            details.append(
                {
                    "path": f"options.{name}",
                    "type": "value_error",
                    "message": "a schedule's runs start at their tick; this option cannot apply",
                }
            )
    if details:
        if any(d["path"] == "cron" for d in details):
            raise InvalidCron("the cron expression cannot be used", details=details)
        raise ValidationFailed("the schedule cannot be used", details=details)


def _view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "task": row["task"],
        "cron": row["cron"],
        "timezone": row["timezone"],
        "payload": row["payload"],
        "options": row["options"],
        "enabled": bool(row["enabled"]),
        "next_run_at": isoformat(row["next_run_at"]),
        "last_run_at": isoformat(row["last_run_at"]),
        "last_run_id": row["last_run_id"],
        "external_id": row.get("external_id"),
        "deduplication_key": row.get("deduplication_key"),
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
    }


def _options_json(options: TriggerOptions) -> dict[str, Any]:
    return options.model_dump(mode="json", exclude_defaults=True)


def create_schedule(
    conn: sa.Connection,
    project_id: str,
    task: str,
    cron: str,
    timezone: str,
    payload: Any,
    options: TriggerOptions,
    enabled: bool,
    now: dt.datetime,
    external_id: str | None = None,
    deduplication_key: str | None = None,
) -> dict[str, Any]:
    """A new schedule; or, when the project has one with ``deduplication_key``,
    that one changed to what is given (its ID stays).

    :raises LostRace: another process made one with that key meanwhile
    """
    if deduplication_key is not None:
        found = conn.execute(
            sa.select(schedules.c.id).where(
                schedules.c.project_id == project_id,
                schedules.c.deduplication_key == deduplication_key,
            )
        ).scalar()
        if found is not None:
            changes = {
                "task": task,
                "cron": cron,
                "timezone": timezone,
                "payload": payload,
                "options": options,
                "enabled": enabled,
                "external_id": external_id,
            }
            return update_schedule(conn, project_id, found, changes, now)
    row = {
        "id": new_id("sched"),
        "project_id": project_id,
        "task": task,
        "cron": cron,
        "timezone": timezone,
        "payload": payload,
        "options": _options_json(options),
        "enabled": enabled,
        "next_run_at": next_tick(cron, timezone, now) if enabled else None,
        "last_run_at": None,
        "last_run_id": None,
        "external_id": external_id,
        "deduplication_key": deduplication_key,
        "created_at": now,
        "updated_at": now,
    }
    insert = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(schedules)
    if conn.execute(insert.values(**row).on_conflict_do_nothing()).rowcount != 1:
        raise LostRace(row["id"])
    return _view(row)


def _row(conn: sa.Connection, project_id: str, schedule_id: str) -> dict[str, Any]:
    return owned_row(conn, schedules, schedule_id, project_id, ScheduleNotFound(schedule_id))


def get_schedule(conn: sa.Connection, project_id: str, schedule_id: str) -> dict[str, Any]:
    """:raises ScheduleNotFound: no such schedule in the project"""
    return _view(_row(conn, project_id, schedule_id))


def list_schedules(conn: sa.Connection, project_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(schedules)
        .where(schedules.c.project_id == project_id)
        .order_by(schedules.c.created_at.desc(), schedules.c.id.desc())
    ).mappings()
    return [_view(dict(r)) for r in rows]


def update_schedule(
    conn: sa.Connection,
    project_id: str,
    schedule_id: str,
    changes: Mapping[str, Any],
    now: dt.datetime,
) -> dict[str, Any]:
    """Change what is given; the next tick is counted again from now.

    :raises ScheduleNotFound: no such schedule in the project
    """
    row = _row(conn, project_id, schedule_id)
    values = dict(changes)
    if isinstance(values.get("options"), TriggerOptions):
        values["options"] = _options_json(values["options"])
    merged = {**row, **values}
    values["next_run_at"] = (
        next_tick(merged["cron"], merged["timezone"], now) if merged["enabled"] else None
    )
    conn.execute(
        schedules.update().where(schedules.c.id == schedule_id).values(updated_at=now, **values)
    )
    return get_schedule(conn, project_id, schedule_id)


def delete_schedule(conn: sa.Connection, project_id: str, schedule_id: str) -> None:
    """Its runs stay (with their ``schedule_id``); it makes no more.

    :raises ScheduleNotFound: no such schedule in the project
    """
    _row(conn, project_id, schedule_id)
    conn.execute(schedules.delete().where(schedules.c.id == schedule_id))


def _latest_tick(row: Mapping[str, Any], now: dt.datetime) -> dt.datetime:
    """The latest tick at or before ``now``: the due one, or the last of those
    missed while nothing ran (they make one run, not one each)."""
    tick: dt.datetime = row["next_run_at"]
    latest = previous_tick(row["cron"], row["timezone"], now)
    return latest if latest is not None and latest > tick else tick


def _due(now: dt.datetime | sa.BindParameter[Any]) -> sa.ColumnElement[bool]:
    return sa.and_(schedules.c.enabled.is_(True), schedules.c.next_run_at <= now)


def due_now(now: dt.datetime | sa.BindParameter[Any]) -> sa.ColumnElement[bool]:
    """Whether :func:`fire_due` has a schedule to fire at ``now``."""
    return sa.exists().where(_due(now))


def fire_due(conn: sa.Connection, now: dt.datetime, limit: int = 100) -> Effects:
    """One run for each due schedule, for its latest due tick; their next ticks
    move past now. Returns the jobs of the runs that start now."""
    due = conn.execute(
        sa.select(schedules)
        .where(_due(now))
        .order_by(schedules.c.next_run_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).mappings()
    done = Effects()
    for row in [dict(r) for r in due]:
        try:
            following = next_tick(row["cron"], row["timezone"], now)
        except CronError:
            # Stored before such expressions were refused: it would never
            # tick again, so it stops here instead of failing every pass.
            conn.execute(
                schedules.update()
                .where(schedules.c.id == row["id"])
                .values(enabled=False, next_run_at=None, updated_at=now)
            )
            continue
        tick = _latest_tick(row, now)
        options = TriggerOptions.model_validate(row["options"])
        item = new_run(
            row["project_id"],
            row["task"],
            row["payload"],
            options,
            now=now,
            callback_url=options.callback_url,
        )
        item.row.update(schedule_id=row["id"], scheduled_at=tick)
        run_id: str | None = item.row["id"]
        try:
            with savepoint(conn):
                created = create_runs(conn, [NewRun(item.row)])
            done.add(created.effects)
        except IntegrityError:  # this tick has its run already
            run_id = row["last_run_id"]
        conn.execute(
            schedules.update()
            .where(schedules.c.id == row["id"])
            .values(
                last_run_at=tick,
                last_run_id=run_id,
                next_run_at=following,
                updated_at=now,
            )
        )
    return done
