"""Prometheus metrics: the counters and histograms, kept where the events happen.

Transitions and reconciler passes count here. With
``PROMETHEUS_MULTIPROC_DIR`` set (``gateway web`` sets it when
``WEB_CONCURRENCY`` > 1), every uvicorn worker writes its own files and a
scrape sums them, so any process answers for all. ``GET /metrics`` is served
by ``gateway.api.health``, which also reads the queue depth, the runs in
flight, the callbacks waiting for a dispatcher and the callback attempts by
outcome (counted in Redis by whichever process records them:
``webhooks.dispatch.attempt_counts_key``) when scraped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    Counter,
    Histogram,
)

from db.models import Run, RunStatus

__all__ = [
    "RECONCILER_ACTIONS",
    "TRIGGER_GROUPS",
    "observe_transition",
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
TRIGGER_GROUPS = Histogram(
    "gateway_trigger_group_size",
    "Triggers created together in one unit of work (gateway.services.coalesce)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
RECONCILER_ACTIONS = Counter(
    "gateway_reconciler_actions_total",
    "What the reconciler and the scheduler did (requeued_run, requeued_delivery, "
    "released_delivery, pumped_run, lost_attempt, released_or_expired)",
    ["action"],
)


def observe_transition(run: Mapping[str, Any], to: RunStatus, now: dt.datetime) -> None:
    """Count a transition once its transaction has committed
    (``gateway.services.units``: a unit rolled back and run again counts once)."""
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
