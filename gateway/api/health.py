"""``/healthz``, ``/readyz`` and ``/metrics``: is the process alive, does what it
needs answer, and what has it done."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from typing import Any

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from db.models import Run, RunStatus
from gateway.api import views
from gateway.api.routing import ApiRoute, Operation
from gateway.errors import Unauthorized, error_response
from gateway.services import Services, services_of
from webhooks.dispatch import attempt_counts_key

__all__ = ["routes"]

log = logging.getLogger("gateway.metrics")

runs = Run.__table__  # type: ignore[attr-defined]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    services = services_of(request)
    checks: dict[str, str] = {}

    async def check(name: str, probe: Any) -> None:
        try:
            await asyncio.wait_for(probe, timeout=2.0)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"[:300]

    await asyncio.gather(
        check("database", services.db.ping()), check("redis", services.redis.ping())
    )
    if checks["database"] == "ok":
        problem = await services.schema.problem()
        checks["schema"] = problem or "ok"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ok", "checks": checks})
    failing = [{"check": k, "message": v} for k, v in checks.items() if v != "ok"]
    return error_response(503, "not_ready", "a dependency does not answer", failing)


class _LiveState:
    """Gauges read when scraped: queue depth (Redis) and runs not final
    (database), and whether each of the two answered. A source that does not
    answer leaves its gauge out and sets its ``*_up`` gauge to 0: metrics
    matter most during an outage, so the scrape itself never fails for one."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.values: dict[str, Any] = {}
        self.up: dict[str, bool] = {}

    async def _read(self, source: str, key: str, probe: Any) -> None:
        try:
            self.values[key] = await asyncio.wait_for(probe, timeout=2.0)
            self.up[source] = True
        except Exception as exc:
            self.up[source] = False
            log.warning("/metrics: %s does not answer: %s", source, str(exc)[:200])

    async def load(self) -> None:
        services = services_of(self.request)

        def by_status(conn: sa.Connection) -> list[tuple[str, str, int]]:
            live = [s.value for s in RunStatus if not s.is_final]
            rows = conn.execute(
                sa.select(runs.c.task, runs.c.status, sa.func.count())
                .where(runs.c.status.in_(live))
                .group_by(runs.c.task, runs.c.status)
            )
            return [(r[0], r[1], int(r[2])) for r in rows]

        await asyncio.gather(
            self._read("redis", "queue", services.redis.zcard(services.settings.queue_name)),
            self._read("database", "live", services.db.read(by_status)),
        )
        if self.up.get("redis"):
            await self._read("redis", "attempts", self._attempts(services))
        if services.settings.webhook_dispatcher and self.up.get("redis"):
            await self._read("redis", "handover", services.dispatcher.handover_backlog())

    @staticmethod
    async def _attempts(services: Services) -> dict[str, int]:
        counts = await services.redis.hgetall(attempt_counts_key(services.settings))  # type: ignore[misc]
        return {k.decode(): int(v) for k, v in counts.items()}

    def collect(self) -> Any:
        for source in ("redis", "database"):
            up = GaugeMetricFamily(
                f"gateway_{source}_up", f"1 if {source} answered this scrape, else 0"
            )
            up.add_metric([], 1 if self.up.get(source) else 0)
            yield up
        if "queue" in self.values:
            queue = GaugeMetricFamily("gateway_queue_depth", "Jobs waiting in the arq queue")
            queue.add_metric([], self.values["queue"])
            yield queue
        if "attempts" in self.values:
            attempts = CounterMetricFamily(
                "gateway_delivery_attempts",
                "Callback attempts by outcome, recorded by any process",
                labels=["outcome"],
            )
            for outcome, count in sorted(self.values["attempts"].items()):
                attempts.add_metric([outcome], count)
            yield attempts
        if "handover" in self.values:
            count, waited = self.values["handover"]
            waiting = GaugeMetricFamily(
                "gateway_callbacks_handed_over",
                "First callback attempts handed over to `gateway dispatch`, not yet taken",
            )
            waiting.add_metric([], count)
            yield waiting
            oldest = GaugeMetricFamily(
                "gateway_callbacks_waiting_seconds",
                "How long the oldest of them has waited (0: none waits)",
            )
            oldest.add_metric([], waited)
            yield oldest
        if "live" in self.values:
            live = GaugeMetricFamily(
                "gateway_runs_in_flight",
                "Runs not final, by task and status (EXECUTING: jobs in flight)",
                labels=["task", "status"],
            )
            for task, status, count in self.values["live"]:
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
    token = services_of(request).settings.metrics_token
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


routes = [
    ApiRoute(
        "GET",
        "/healthz",
        healthz,
        Operation("The process is alive", "health", {200: views.Health}, auth="none"),
    ),
    ApiRoute(
        "GET",
        "/metrics",
        metrics,
        Operation(
            "Prometheus metrics (a bearer METRICS_TOKEN when one is set)",
            "health",
            {200: "text/plain in the Prometheus format"},
            auth="none",
            errors=(401,),
        ),
    ),
    ApiRoute(
        "GET",
        "/readyz",
        readyz,
        Operation(
            "The database and Redis answer",
            "health",
            {200: views.Health},
            auth="none",
            errors=(503,),
        ),
    ),
]
