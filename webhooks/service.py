"""The callback service: endpoints, their secrets, and the delivery log.

What a project manages through the API: its endpoints (with the SSRF rules
applied at registration), their signing secrets and rotation, the log of every
message and attempt, a resend, a recovery. Sending itself is the dispatcher's
(``webhooks.dispatch``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
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
from db.rows import owned_row
from db.types import isoformat, utcnow
from gateway.errors import NotFound, ValidationFailed
from gateway.settings import Settings
from jobs.protocol import delivery_job_id
from webhooks.deliveries import (
    attempts_of,
    delivery_view,
    list_deliveries,
)
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
    TEST_EVENT,
    Outgoing,
    active_secrets,
    encode_body,
    event_body,
    insert_delivery,
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

        def insert(conn: sa.Connection) -> None:
            conn.execute(endpoints.insert(), row)
            conn.execute(
                endpoint_secrets.insert(),
                {"endpoint_id": row["id"], "secret": secret, "created_at": now},
            )

        await self.db.write(insert)
        return {**endpoint_view(row), "secret": secret}

    async def list_endpoints(self, project_id: str) -> list[dict[str, Any]]:
        def select(conn: sa.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                sa.select(endpoints)
                .where(endpoints.c.project_id == project_id, endpoints.c.deleted_at.is_(None))
                .order_by(endpoints.c.created_at)
            ).mappings()
            return [endpoint_view(dict(r)) for r in rows]

        return await self.db.read(select)

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

        def update(conn: sa.Connection) -> dict[str, Any]:
            load_endpoint(conn, project_id, endpoint_id)
            values: dict[str, Any] = {**changes, "updated_at": utcnow()}
            if changes.get("enabled") is True:
                values.update(disabled_reason=None, disabled_at=None, failing_since=None)
            elif changes.get("enabled") is False:
                values.update(disabled_reason="disabled by the owner", disabled_at=utcnow())
            conn.execute(endpoints.update().where(endpoints.c.id == endpoint_id).values(**values))
            return load_endpoint(conn, project_id, endpoint_id)

        return endpoint_view(await self.db.write(update))

    async def delete_endpoint(self, project_id: str, endpoint_id: str) -> None:
        """Delete the endpoint; its pending deliveries end ``failed`` at once,
        and their queued attempts are aborted before they start."""

        def delete(conn: sa.Connection) -> list[str]:
            load_endpoint(conn, project_id, endpoint_id)
            now = utcnow()
            conn.execute(
                endpoints.update()
                .where(endpoints.c.id == endpoint_id)
                .values(deleted_at=now, enabled=False, updated_at=now)
            )
            pending = sa.and_(
                deliveries.c.endpoint_id == endpoint_id,
                deliveries.c.status == DeliveryStatus.PENDING.value,
            )
            queued = [
                delivery_job_id(r.id, r.schedule_step)
                for r in conn.execute(
                    sa.select(deliveries.c.id, deliveries.c.schedule_step).where(pending)
                )
            ]
            conn.execute(
                deliveries.update()
                .where(pending)
                .values(
                    status=DeliveryStatus.FAILED.value,
                    next_attempt_at=None,
                    leased_at=None,
                    last_error="endpoint deleted",
                    updated_at=now,
                )
            )
            return queued

        queued = await self.db.write(delete)
        if queued:
            try:
                now_ms = int(utcnow().timestamp() * 1000)
                await self.redis.zadd(abort_jobs_ss, dict.fromkeys(queued, now_ms))
            except (RedisError, OSError) as exc:
                # The attempts still ask the gateway first, and are told no.
                log.warning("could not abort the attempts of deleted endpoint: %s", exc)

    async def get_secret(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        def read(conn: sa.Connection) -> dict[str, Any]:
            load_endpoint(conn, project_id, endpoint_id)
            now = utcnow()
            rows = (
                conn.execute(
                    sa.select(endpoint_secrets)
                    .where(
                        endpoint_secrets.c.endpoint_id == endpoint_id,
                        sa.or_(
                            endpoint_secrets.c.expires_at.is_(None),
                            endpoint_secrets.c.expires_at > now,
                        ),
                    )
                    .order_by(endpoint_secrets.c.id.desc())
                )
                .mappings()
                .all()
            )
            return {
                "secret": rows[0]["secret"],
                "previous": [
                    {"secret": r["secret"], "expires_at": isoformat(r["expires_at"])}
                    for r in rows[1:]
                ],
            }

        return await self.db.read(read)

    async def rotate_secret(
        self, project_id: str, endpoint_id: str, request: RotateRequest
    ) -> dict[str, Any]:
        grace = (
            self.settings.webhook_rotation_grace
            if request.grace_period is None
            else request.grace_period
        )

        def rotate(conn: sa.Connection) -> dict[str, Any]:
            load_endpoint(conn, project_id, endpoint_id)
            now = utcnow()
            expires = now + dt.timedelta(seconds=grace)
            # Every secret still signing stops at the end of the grace period at
            # the latest; one that would stop sooner keeps its own end.
            conn.execute(
                endpoint_secrets.update()
                .where(
                    endpoint_secrets.c.endpoint_id == endpoint_id,
                    sa.or_(
                        endpoint_secrets.c.expires_at.is_(None),
                        endpoint_secrets.c.expires_at > expires,
                    ),
                )
                .values(expires_at=expires)
            )
            secret = generate_webhook_secret()
            conn.execute(
                endpoint_secrets.insert(),
                {"endpoint_id": endpoint_id, "secret": secret, "created_at": now},
            )
            return {"secret": secret, "previous_expires_at": isoformat(expires)}

        return await self.db.write(rotate)

    async def project_secret(self, project_id: str) -> str:
        return await self.db.write(project_secret, project_id)

    async def send_test(self, project_id: str, endpoint_id: str) -> dict[str, Any]:
        def insert(conn: sa.Connection) -> tuple[dict[str, Any], Outgoing]:
            endpoint = load_endpoint(conn, project_id, endpoint_id)
            now = utcnow()
            payload = event_body(
                TEST_EVENT,
                {"endpoint_id": endpoint_id, "message": "a test event from the gateway"},
                now,
            )
            delivery_id = insert_delivery(
                conn,
                project_id=project_id,
                endpoint_id=endpoint_id,
                run_id=None,
                url=endpoint["url"],
                event_type=TEST_EVENT,
                payload=payload,
                now=now,
            )
            secrets_ = tuple(active_secrets(conn, endpoint_id, now))
            row = conn.execute(sa.select(deliveries).where(deliveries.c.id == delivery_id))
            view = delivery_view(dict(row.mappings().one()), [])
            return view, Outgoing(
                delivery_id, endpoint["url"], encode_body(payload), secrets_, endpoint["id"]
            )

        view, outgoing = await self.db.write(insert)
        await self.dispatcher.dispatch([outgoing])
        return view

    # deliveries ----------------------------------------------------------------

    async def endpoint_deliveries(
        self, project_id: str, endpoint_id: str, *, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        def read(conn: sa.Connection) -> dict[str, Any]:
            load_endpoint(conn, project_id, endpoint_id)
            return list_deliveries(conn, deliveries.c.endpoint_id == endpoint_id, limit, cursor)

        return await self.db.read(read)

    async def run_deliveries(
        self, project_id: str, run_id: str, *, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        def read(conn: sa.Connection) -> dict[str, Any]:
            owner = conn.scalar(sa.select(runs.c.project_id).where(runs.c.id == run_id))
            if owner != project_id:
                raise NotFound(f"no run with id {run_id!r}", code="run_not_found")
            return list_deliveries(conn, deliveries.c.run_id == run_id, limit, cursor)

        return await self.db.read(read)

    async def resend(self, project_id: str, delivery_id: str) -> dict[str, Any]:
        def reset(conn: sa.Connection) -> dict[str, Any]:
            row = owned_row(
                conn,
                deliveries,
                delivery_id,
                project_id,
                NotFound(f"no delivery with id {delivery_id!r}", code="delivery_not_found"),
            )
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .values(status=DeliveryStatus.PENDING.value, updated_at=utcnow())
            )
            attempts = attempts_of(conn, [delivery_id])[delivery_id]
            return delivery_view({**row, "status": DeliveryStatus.PENDING.value}, attempts)

        view = await self.db.write(reset)
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
        statuses = [DeliveryStatus.FAILED.value]
        if request.include_pending:
            statuses.append(DeliveryStatus.PENDING.value)

        def reset(conn: sa.Connection) -> dict[str, list[str]]:
            load_endpoint(conn, project_id, endpoint_id)
            found: dict[str, list[str]] = {status: [] for status in statuses}
            for row in conn.execute(
                sa.select(deliveries.c.id, deliveries.c.status)
                .where(
                    deliveries.c.endpoint_id == endpoint_id,
                    deliveries.c.status.in_(statuses),
                    deliveries.c.created_at >= request.since,
                )
                .order_by(deliveries.c.id)
            ):
                found[row.status].append(row.id)
            failed = found[DeliveryStatus.FAILED.value]
            if failed:
                conn.execute(
                    deliveries.update()
                    .where(deliveries.c.id.in_(failed))
                    .values(status=DeliveryStatus.PENDING.value, updated_at=utcnow())
                )
            return found

        found = await self.db.write(reset)
        failed = found[DeliveryStatus.FAILED.value]
        pending = found.get(DeliveryStatus.PENDING.value, [])
        ids = sorted(failed + pending)
        for delivery_id in ids:
            await self.dispatcher.resend(delivery_id)
        return {"count": len(ids), "delivery_ids": ids, "failed": failed, "pending": pending}
