"""The long-lived objects one gateway process shares between requests."""

from __future__ import annotations

import dataclasses

from arq import ArqRedis
from starlette.requests import Request

from db.engine import Database
from gateway.artifacts import ArtifactStore
from gateway.auth.keys import ApiKeyAuth
from gateway.auth.tokens import PublicTokens
from gateway.notify import RunNotifier
from gateway.schema import SchemaGate
from gateway.services.queues import FlowService
from gateway.services.runs import RunService
from gateway.services.schedules import ScheduleService
from gateway.services.waitpoints import WaitpointService
from gateway.settings import Settings
from gateway.workers import WorkerDirectory
from jobs.tasks.registry import TaskRegistry
from webhooks.dispatch import DeliveryDispatcher
from webhooks.service import WebhookService

__all__ = ["Services", "services_of"]


@dataclasses.dataclass
class Services:
    settings: Settings
    db: Database
    redis: ArqRedis
    registry: TaskRegistry
    auth: ApiKeyAuth
    tokens: PublicTokens
    artifacts: ArtifactStore
    notifier: RunNotifier
    webhooks: WebhookService
    dispatcher: DeliveryDispatcher
    runs: RunService
    #: Queues (limits, pauses) and bulk actions.
    flow: FlowService
    schedules: ScheduleService
    waitpoints: WaitpointService
    #: Whether the database is at this code's schema (API calls wait on it).
    schema: SchemaGate
    #: The workers that are there (``GET /api/v1/workers``).
    workers: WorkerDirectory


def services_of(request: Request) -> Services:
    """The process's services, as the app's lifespan made them."""
    services: Services = request.app.state.services
    return services
