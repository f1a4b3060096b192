"""The workers that are there: what each last said of itself.

Every worker's heartbeat thread posts a :class:`jobs.protocol.WorkerPresence`
each ``HEARTBEAT_INTERVAL`` (``jobs.liveness.heartbeat``); the gateway keeps the last one
of each worker in one Redis hash (``<QUEUE_NAME>:workers``), with the time it
came. Nothing of it goes to the database: it is a view of the moment, as the
queues are, and a worker forgotten by a Redis restart says itself again within
one interval. A worker is ``online`` while it has been heard from within
``HEARTBEAT_TIMEOUT`` (the same bound after which its runs are ``worker_lost``),
``lost`` after that, and ``stopped`` once it said goodbye; either of the last
two is forgotten after ``WORKER_FORGET_AFTER``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from arq import ArqRedis
from redis.exceptions import RedisError

from db.engine import Database
from db.models import Run
from db.types import utcnow
from gateway.errors import ServiceUnavailable
from gateway.settings import Settings
from jobs.protocol import WorkerPresence, dumps, loads

__all__ = ["WorkerDirectory"]

runs = Run.__table__  # type: ignore[attr-defined]


def _redis_unavailable(exc: RedisError) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"Redis does not answer ({type(exc).__name__}); try again shortly",
        code="redis_unavailable",
        headers={"retry-after": "2"},
    )


class WorkerDirectory:
    """Records workers' presence and lists the workers with their state."""

    def __init__(self, *, db: Database, redis: ArqRedis, settings: Settings) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings
        self.key = f"{settings.queue_name}:workers"

    async def record(self, presence: WorkerPresence) -> None:
        entry = {**presence.model_dump(), "seen_at": utcnow().isoformat()}
        try:
            await self.redis.hset(self.key, presence.id, dumps(entry).decode())  # type: ignore[misc]
        except RedisError as exc:
            raise _redis_unavailable(exc) from None

    async def list(self, project_id: str) -> list[dict[str, Any]]:
        """Every worker not yet forgotten, online ones first; ``runs`` are
        those of ``project_id`` alone (workers serve every project)."""
        try:
            raw = await self.redis.hgetall(self.key)  # type: ignore[misc]
        except RedisError as exc:
            raise _redis_unavailable(exc) from None
        now = utcnow()
        workers, forget = [], []
        for worker_id, data in raw.items():
            entry = loads(data)
            seen = dt.datetime.fromisoformat(entry["seen_at"])
            silent = (now - seen).total_seconds()
            if entry["state"] == "stopped":
                status = "stopped"
            elif silent <= self.settings.heartbeat_timeout:
                status = "online"
            else:
                status = "lost"
            if status != "online" and silent > self.settings.worker_forget_after:
                forget.append(worker_id)
                continue
            workers.append(
                {
                    **{k: v for k, v in entry.items() if k not in ("seen_at", "state")},
                    "status": status,
                    "last_heartbeat_at": entry["seen_at"],
                }
            )
        if forget:
            try:
                await self.redis.hdel(self.key, *forget)  # type: ignore[misc]
            except RedisError:
                pass  # the next listing forgets them
        theirs = await self._project_runs(project_id, [r for w in workers for r in w["runs"]])
        for worker in workers:
            worker["runs"] = [run_id for run_id in worker["runs"] if run_id in theirs]
        order = {"online": 0, "lost": 1, "stopped": 2}
        workers.sort(key=lambda w: (order[w["status"]], w["id"]))
        return workers

    async def _project_runs(self, project_id: str, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()

        def read(conn: sa.Connection) -> set[str]:
            found: set[str] = set()
            ids = list(dict.fromkeys(run_ids))
            for start in range(0, len(ids), 500):
                found.update(
                    conn.execute(
                        sa.select(runs.c.id).where(
                            runs.c.project_id == project_id, runs.c.id.in_(ids[start : start + 500])
                        )
                    ).scalars()
                )
            return found

        return await self.db.read(read)
