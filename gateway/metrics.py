"""Prometheus metrics (``GET /metrics``).

Counters and histograms are kept where the events happen (transitions,
delivery attempts, reconciler passes). With ``PROMETHEUS_MULTIPROC_DIR`` set
(``gateway web`` sets it when ``WEB_CONCURRENCY`` > 1), every uvicorn worker
writes its own files and a scrape sums them, so any process answers for all.
Queue depth and the runs in flight are read from Redis and the database when
scraped.
"""

from __future__ import annotations

import datetime as dt
import hmac
import os
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from db.models import Run, RunStatus
from gateway.errors import Unauthorized

__all__ = [
    "DELIVERY_ATTEMPTS",
    "RECONCILER_ACTIONS",
    "observe_transition",
    "routes",
]

runs = Run.__table__  # type: ignore[attr-defined]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

RUN_TRANSITIONS = Counter(
    "gateway_runs_total", "Runs that entered each status, by task", ["task", "status"]
)
RUN_LATENCY = Histogram(
    "gateway_run_latency_seconds",
    "From trigger to a final status",
    ["task", "status"],
    buckets=_LATENCY_BUCKETS,
)
TASK_DURATION = Histogram(
    "gateway_task_duration_seconds",
    "From the first start to a final status",
    ["task"],
    buckets=_LATENCY_BUCKETS,
)
DELIVERY_ATTEMPTS = Counter(
    "gateway_delivery_attempts_total", "Callback attempts by outcome", ["outcome"]
)
RECONCILER_ACTIONS = Counter(
    "gateway_reconciler_actions_total",
    "What the reconciler and the scheduler did (requeued_run, requeued_delivery, "
    "lost_attempt, released, expired)",
    ["action"],
)


def observe_transition(run: Mapping[str, Any], to: RunStatus, now: dt.datetime) -> None:
    """Count a transition (called in its transaction: a rolled-back one, after
    a lost race, is counted too; that is rare and only ever one)."""
    task = str(run.get("task"))
    RUN_TRANSITIONS.labels(task=task, status=to.value).inc()
    if not to.is_final:
        return
    created = run.get("created_at")
    if created is not None:
        RUN_LATENCY.labels(task=task, status=to.value).observe(
            max(0.0, (now - created).total_seconds())
        )
    started = run.get("started_at")
    if started is not None:
        TASK_DURATION.labels(task=task).observe(max(0.0, (now - started).total_seconds()))


class _LiveState:
    """Gauges read when scraped: queue depth (Redis) and runs not final (database)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.values: dict[str, Any] = {}

    async def load(self) -> None:
        services = self.request.app.state.services
        self.values["queue"] = await services.redis.zcard(services.settings.queue_name)

        def by_status(conn: sa.Connection) -> list[tuple[str, str, int]]:
            live = [s.value for s in RunStatus if not s.is_final]
            rows = conn.execute(
                sa.select(runs.c.task, runs.c.status, sa.func.count())
                .where(runs.c.status.in_(live))
                .group_by(runs.c.task, runs.c.status)
            )
            return [(r[0], r[1], int(r[2])) for r in rows]

        self.values["live"] = await services.db.read(by_status)

    def collect(self) -> Any:
        queue = GaugeMetricFamily("gateway_queue_depth", "Jobs waiting in the arq queue")
        queue.add_metric([], self.values.get("queue", 0))
        yield queue
        live = GaugeMetricFamily(
            "gateway_runs_in_flight",
            "Runs not final, by task and status (EXECUTING: jobs in flight)",
            labels=["task", "status"],
        )
        for task, status, count in self.values.get("live", []):
            live.add_metric([task, status], count)
        yield live


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


async def metrics(request: Request) -> Response:
    """Open by default (for a scraper on a private network); with
    ``METRICS_TOKEN`` set, only ``Authorization: Bearer <METRICS_TOKEN>``."""
    token = request.app.state.services.settings.metrics_token
    if token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise Unauthorized(
                "/metrics needs `Authorization: Bearer <METRICS_TOKEN>`", code="invalid_token"
            )
    live = _LiveState(request)
    await live.load()
    registry = _registry()
    scrape = CollectorRegistry()
    scrape.register(live)
    body = generate_latest(registry) + generate_latest(scrape)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics, methods=["GET"])]
