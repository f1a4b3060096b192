"""The callback service: endpoints, their secrets, and the delivery log.

What a project manages through the API: its endpoints (with the SSRF rules
applied at registration), their signing secrets and rotation, the log of every
message and attempt, a resend, a recovery. Sending itself is the dispatcher's
(``webhooks.dispatch``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from arq import ArqRedis
from arq.constants import abort_jobs_ss
from redis.exceptions import RedisError

from db.engine import Database
from db.ids import new_id
from db.models import (
    Delivery,
    DeliveryStatus,
    EndpointSecret,
    Run,
    WebhookEndpoint,
)
from db.types import utcnow
from gateway.errors import ValidationFailed
from gateway.settings import Settings
from webhooks import units
from webhooks.dispatch import DeliveryDispatcher
from webhooks.endpoints import endpoint_view, load_endpoint
from webhooks.models import (
    EndpointCreate,
    EndpointUpdate,
    RecoverRequest,
    RotateRequest,
)
from webhooks.outbox import (
    EVENT_TYPES,
    project_secret,
)
from webhooks.signing import generate_webhook_secret
from webhooks.ssrf import AddressRefused, IPNetwork, parse_networks, validate_url

__all__ = ["WebhookService"]

log = logging.getLogger("webhooks.service")

endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
endpoint_secrets = EndpointSecret.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
runs = Run.__table__  # type: ignore[attr-defined]


class WebhookService:
    def __init__(
        self,
        *,
        db: Database,
        redis: ArqRedis,
        settings: Settings,
        dispatcher: DeliveryDispatcher,
        task_names: Sequence[str],
    ) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.redis = redis
        self.settings = settings
        self.allowed: tuple[IPNetwork, ...] = parse_networks(settings.webhook_allowed_networks)
        self.task_names = set(task_names)

    # validation ----------------------------------------------------------------

    def check_url(self, url: str, field: str = "url") -> str:
        """``url`` in the form the gateway stores and calls (IDNA host, see
        ``webhooks.ssrf.normalize_url``), or a 422 ``url_not_allowed``."""
        try:
            return validate_url(url, self.allowed)
        except AddressRefused as exc:
            raise ValidationFailed(
                f"this URL cannot be called: {exc.reason}",
                code="url_not_allowed",
                details=[{"path": field, "message": exc.reason, "type": "url_not_allowed"}],
            ) from None

    def _check_filters(self, events: Sequence[str] | None, tasks: Sequence[str] | None) -> None:
        details = []
        for i, event in enumerate(events or ()):
            if event != "*" and event not in EVENT_TYPES:
                details.append(
                    {
                        "path": f"events.{i}",
                        "type": "unknown_event",
                        "message": f"unknown event {event!r}; known: *, " + ", ".join(EVENT_TYPES),
                    }
                )
        for i, task in enumerate(tasks or ()):
            if task not in self.task_names:
                details.append(
                    {
                        "path": f"tasks.{i}",
                        "type": "unknown_task",
                        "message": f"no task named {task!r}",
                    }
                )
        if details:
            raise ValidationFailed(details=details)

    # endpoints -----------------------------------------------------------------

    async def create_endpoint(self, project_id: str, request: EndpointCreate) -> dict[str, Any]:
        url = self.check_url(request.url)
        self._check_filters(request.events, request.tasks)
        now = utcnow()
        secret = generate_webhook_secret()
        row = {
            "id": new_id("ep"),
            "project_id": project_id,
            "url": url,
            "description": request.description,
            "events": request.events,
            "tasks": request.tasks,
            "enabled": True,
            "disabled_reason": None,
            "disabled_at": None,
            "failing_since": None,
            "last_success_at": None,
            "created_at": now,
            "updated_at": now,
            "deleted_at": None,
        }

        await self.db.write(units.insert_endpoint, row, secret)
        return {**endpoint_view(row), "secret": secret}

    async def list_endpoints(self, project_id: str) -> list[dict[str, Any]]:
        return await self.db.read(units.list_endpoints, project_id)

    async def get_endpoint(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        return endpoint_view(await self.db.read(load_endpoint, project_id, endpoint_id))

    async def update_endpoint(
        self, project_id: str, endpoint_id: str, request: EndpointUpdate
    ) -> dict[str, Any]:
        changes = request.model_dump(exclude_unset=True)
        if request.url is not None:
            changes["url"] = self.check_url(request.url)
        self._check_filters(request.events, request.tasks)
        for name in ("url", "events", "tasks", "description", "enabled"):
            if name in changes and changes[name] is None:
                raise ValidationFailed(
                    details=[{"path": name, "type": "null", "message": "may not be null"}]
                )

        return endpoint_view(
            await self.db.write(units.update_endpoint, project_id, endpoint_id, changes)
        )

    async def delete_endpoint(self, project_id: str, endpoint_id: str) -> None:
        """Delete the endpoint; its pending deliveries end ``failed`` at once,
        and their queued attempts are aborted before they start."""

        queued = await self.db.write(units.delete_endpoint, project_id, endpoint_id)
        if queued:
            try:
                now_ms = int(utcnow().timestamp() * 1000)
                await self.redis.zadd(abort_jobs_ss, dict.fromkeys(queued, now_ms))
            except (RedisError, OSError) as exc:
                # The attempts still ask the gateway first, and are told no.
                log.warning("could not abort the attempts of deleted endpoint: %s", exc)

    async def get_secret(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        return await self.db.read(units.read_secrets, project_id, endpoint_id)

    async def rotate_secret(
        self, project_id: str, endpoint_id: str, request: RotateRequest
    ) -> dict[str, Any]:
        grace = (
            self.settings.webhook_rotation_grace
            if request.grace_period is None
            else request.grace_period
        )

        return await self.db.write(
            units.rotate_secret, project_id, endpoint_id, generate_webhook_secret(), grace
        )

    async def project_secret(self, project_id: str) -> str:
        return await self.db.write(project_secret, project_id)

    async def send_test(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        view, outgoing = await self.db.write(units.insert_test_delivery, project_id, endpoint_id)
        await self.dispatcher.dispatch([outgoing])
        return view

    # deliveries ----------------------------------------------------------------

    async def endpoint_deliveries(
        self, project_id: str, endpoint_id: str, *, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        return await self.db.read(units.endpoint_deliveries, project_id, endpoint_id, limit, cursor)

    async def run_deliveries(
        self, project_id: str, run_id: str, *, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        return await self.db.read(units.run_deliveries, project_id, run_id, limit, cursor)

    async def resend(self, project_id: str, delivery_id: str) -> dict[str, Any]:
        view = await self.db.write(units.reset_delivery, project_id, delivery_id)
        await self.dispatcher.resend(delivery_id)
        return view

    async def recover(
        self, project_id: str, endpoint_id: str, request: RecoverRequest
    ) -> dict[str, Any]:
        """Send again every message since ``request.since`` that failed (and,
        with ``include_pending``, every one still waiting for a retry); which
        were which is in the answer. A failed one is pending again; a pending
        one gets an attempt now beside its scheduled retry, which finds it
        delivered if this one gets through."""
        found = await self.db.write(
            units.recover_deliveries,
            project_id,
            endpoint_id,
            request.since,
            request.include_pending,
        )
        failed = found[DeliveryStatus.FAILED.value]
        pending = found.get(DeliveryStatus.PENDING.value, [])
        ids = sorted(failed + pending)
        for delivery_id in ids:
            await self.dispatcher.resend(delivery_id)
        return {"count": len(ids), "delivery_ids": ids, "failed": failed, "pending": pending}
