"""The Starlette application: ``create_app()`` builds it from the settings."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from db.engine import Database
from gateway.api import api_routes
from gateway.api.bodies import RefuseNul
from gateway.artifacts import ArtifactStore
from gateway.auth.keys import ApiKeyAuth
from gateway.auth.ratelimit import RateLimiter
from gateway.auth.tokens import PublicTokens, WaitpointTokens
from gateway.background.reconciler import LostWorkers, Reconciler, Scheduler, Statistics
from gateway.dashboard import dashboard_routes
from gateway.errors import exception_handlers
from gateway.logs import configure_logging
from gateway.notify import RunNotifier
from gateway.schema import SchemaGate
from gateway.services import Services
from gateway.services.queues import FlowService
from gateway.services.runs import RunService
from gateway.services.schedules import ScheduleService
from gateway.services.units import UnitRunner
from gateway.services.waitpoints import WaitpointService
from gateway.settings import ConfigError, Settings
from gateway.trigger_dev import trigger_dev_routes
from gateway.workers import WorkerDirectory
from jobs import heap, tracing
from jobs.packing import open_pool
from jobs.protocol import redis_settings
from jobs.tasks.registry import load_tasks
from webhooks.dispatch import DeliveryDispatcher
from webhooks.service import WebhookService

__all__ = ["create_app"]

log = logging.getLogger("gateway.app")


async def _check_schema(db: Database) -> SchemaGate:
    """Refuse to serve on a database this code can see is behind (``gateway
    web`` says so before it starts uvicorn; this covers ``uvicorn
    gateway.app:create_app``). One that does not answer yet is checked later."""
    gate = SchemaGate(db)
    problem = await gate.problem()
    if problem is not None:
        await db.dispose()
        raise ConfigError("DATABASE_URL", problem)
    return gate


def create_app(settings: Settings | None = None) -> Starlette:
    """The gateway app. With no ``settings``, they are read from the environment."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    settings.require_secret()
    tracing.setup("gateway-web", settings.tracing_env())
    if not settings.redis_url:
        raise ConfigError("REDIS_URL", "the web process needs a Redis URL (`gateway up` sets one)")
    redis_url = settings.redis_url

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database(settings.database_url, pool_size=settings.database_pool_size)
        schema = await _check_schema(db)
        redis = await open_pool(redis_settings(redis_url), default_queue_name=settings.queue_name)
        notifier = RunNotifier(redis)
        await notifier.start()
        registry = load_tasks(settings.task_modules)
        dispatcher = DeliveryDispatcher(db=db, redis=redis, settings=settings)
        webhooks = WebhookService(
            db=db,
            redis=redis,
            settings=settings,
            dispatcher=dispatcher,
            task_names=registry.names(),
        )
        waitpoint_tokens = WaitpointTokens(settings)
        # What every service runs its units of work and their effects on.
        units = UnitRunner(
            db=db, redis=redis, notifier=notifier, dispatcher=dispatcher, settings=settings
        )
        app.state.services = Services(
            settings=settings,
            db=db,
            redis=redis,
            registry=registry,
            auth=ApiKeyAuth(
                db,
                limiter=RateLimiter(redis),
                default_rate=settings.rate_limit,
                default_burst=settings.rate_burst,
            ),
            tokens=PublicTokens(settings),
            artifacts=ArtifactStore(db, settings),
            notifier=notifier,
            webhooks=webhooks,
            dispatcher=dispatcher,
            runs=RunService(units, webhooks=webhooks, waitpoint_tokens=waitpoint_tokens),
            flow=FlowService(units),
            schedules=ScheduleService(units, webhooks=webhooks),
            waitpoints=WaitpointService(units, tokens=waitpoint_tokens),
            schema=schema,
            workers=WorkerDirectory(db=db, redis=redis, settings=settings),
        )
        services = app.state.services
        reconciler = Reconciler(
            db=db,
            redis=redis,
            runs=services.runs,
            flow=services.flow,
            dispatcher=dispatcher,
            settings=settings,
        )
        scheduler = Scheduler(
            redis=redis,
            runs=services.runs,
            schedules=services.schedules,
            waitpoints=services.waitpoints,
            settings=settings,
        )
        lost_workers = LostWorkers(redis=redis, runs=services.runs, settings=settings)
        statistics = Statistics(redis=redis, db=db)
        await reconciler.start()
        await scheduler.start()
        await lost_workers.start()
        await statistics.start()
        heap.settle()
        try:
            yield
        finally:
            await statistics.stop()
            await lost_workers.stop()
            await scheduler.stop()
            await reconciler.stop()
            await notifier.stop()
            await redis.aclose()
            await db.dispose()
            tracing.shutdown()

    middleware = [Middleware(RefuseNul)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "idempotency-key",
                    # What Trigger.dev's SDK sends from a browser (useRealtimeRun).
                    "trigger-version",
                    "x-trigger-source",
                    "x-trigger-client",
                    "x-trigger-branch",
                    "x-trigger-api-version",
                    "x-trigger-realtime-streams-version",
                    "x-trigger-electric-version",
                    "x-trigger-request-idempotency-key",
                ],
                expose_headers=[
                    "location",
                    "retry-after",
                    "x-ratelimit-limit",
                    "x-ratelimit-remaining",
                    "x-ratelimit-reset",
                    # What the SDK reads: a run's token, and a shape's position.
                    "x-trigger-jwt",
                    "electric-handle",
                    "electric-offset",
                    "electric-schema",
                    "electric-cursor",
                    "electric-up-to-date",
                ],
            )
        )
    return Starlette(
        routes=[
            *api_routes(),
            *dashboard_routes(settings),
            *trigger_dev_routes(),
        ],
        middleware=middleware,
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
