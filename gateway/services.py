"""The long-lived objects one gateway process shares between requests."""

from __future__ import annotations

import dataclasses

from arq import ArqRedis

from db.engine import Database
from gateway.auth import ApiKeyAuth
from gateway.notify import RunNotifier
from gateway.runs.service import RunService
from gateway.settings import Settings
from jobs.tasks.registry import TaskRegistry
from webhooks.service import WebhookService

__all__ = ["Services"]


@dataclasses.dataclass
class Services:
    settings: Settings
    db: Database
    redis: ArqRedis
    registry: TaskRegistry
    auth: ApiKeyAuth
    notifier: RunNotifier
    webhooks: WebhookService
    runs: RunService
