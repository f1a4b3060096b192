"""Sending callbacks: the first attempt after a commit, each retry on its schedule.

After a transition commits, :meth:`DeliveryDispatcher.dispatch` puts a
``deliver_webhook`` job on the deliveries queue (its own slots, apart from task
runs). A worker asks for the delivery's request (:meth:`prepare`, signed
afresh: the gateway keeps the secrets), sends it, and reports the attempt
(:meth:`record_attempt`); a failure queues the next try on the retry schedule.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from arq import ArqRedis
from redis.exceptions import RedisError

from db.engine import Database
from db.ids import new_id
from db.models import Delivery, DeliveryStatus, Run, WebhookEndpoint
from db.types import utcnow
from gateway.errors import APIError
from gateway.queue import QueuedJob, enqueue_jobs
from gateway.settings import Settings
from jobs import tracing
from jobs.contract import DeliverWebhook
from jobs.protocol import clean_text, delivery_job_id
from webhooks.deliveries import (
    RetryPolicy,
    delivery_row,
    lost_attempt,
    outcome_of,
    record_attempt,
    record_attempts,
)
from webhooks.models import DeliveryAttemptReport
from webhooks.outbox import Outgoing, active_secrets, encode_body, project_secret
from webhooks.signing import webhook_headers

__all__ = [
    "DeliveryDispatcher",
    "any_due",
    "attempt_counts_key",
    "claim_first_attempts",
    "handover_key",
    "lease_delivery",
    "lease_due",
    "release_leases",
    "taken_key",
]

log = logging.getLogger("webhooks.dispatch")

endpoints = WebhookEndpoint.__table__  # type: ignore[attr-defined]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
runs = Run.__table__  # type: ignore[attr-defined]


def handover_key(settings: Settings) -> str:
    """The Redis list the gateway hands first attempts to ``gateway dispatch`` on."""
    return f"{settings.queue_name}:callbacks"


def taken_key(settings: Settings) -> str:
    """The Redis sorted set of first attempts ``gateway dispatch`` took from
    the hand-over list and sent without a claim in the database (members:
    delivery IDs; scores: when taken), until each is recorded. A scan that
    finds one of them due knows its attempt went out (:func:`lease_due`)."""
    return f"{settings.queue_name}:callbacks:taken"


def attempt_counts_key(settings: Settings) -> str:
    """The Redis hash of attempts recorded, by outcome, by every process that
    records them (web processes, dispatchers): ``/metrics`` reads it as
    ``gateway_delivery_attempts_total``, so any web process answers for all."""
    return f"{settings.queue_name}:metrics:delivery_attempts"


def lease_delivery(
    conn: sa.Connection,
    delivery_id: str,
    policy: RetryPolicy,
    lease_seconds: float,
    now: dt.datetime,
    *,
    trigger: str = "schedule",
    retried: bool = False,
) -> dict[str, Any] | Outgoing:
    """What to send for ``delivery_id`` now (an :class:`Outgoing`, leased to
    the caller when scheduled), or why nothing goes out (a dict).

    A scheduled attempt whose predecessor went out (``retried``) and was never
    reported first records that one as ``attempt_lost``."""
    row = delivery_row(conn, delivery_id)
    if row["status"] != DeliveryStatus.PENDING.value:
        return {"send": False, "reason": f"the delivery is {row['status']}"}
    leased = row["leased_at"]
    if (
        trigger == "schedule"
        and retried
        and leased is not None
        and leased < now - dt.timedelta(seconds=lease_seconds)
    ):
        outcome = record_attempt(conn, policy, lost_attempt(row), now)
        return {"send": False, "reason": "the last attempt was lost", **outcome}
    if row["endpoint_id"] is None:
        secrets_: tuple[str, ...] = (project_secret(conn, row["project_id"]),)
        url = row["url"]
    else:
        endpoint = (
            conn.execute(sa.select(endpoints).where(endpoints.c.id == row["endpoint_id"]))
            .mappings()
            .one()
        )
        if not endpoint["enabled"] or endpoint["deleted_at"] is not None:
            reason = (
                "endpoint deleted"
                if endpoint["deleted_at"] is not None
                else f"endpoint disabled: {endpoint['disabled_reason']}"
            )
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .values(
                    status=DeliveryStatus.FAILED.value,
                    next_attempt_at=None,
                    leased_at=None,
                    last_error=reason,
                    updated_at=now,
                )
            )
            return {"send": False, "reason": reason}
        secrets_ = (*active_secrets(conn, endpoint["id"], now),)
        url = endpoint["url"]
    if trigger == "schedule":
        conn.execute(
            deliveries.update().where(deliveries.c.id == delivery_id).values(leased_at=now)
        )
    traceparent = (  # read only when there are traces to join
        conn.scalar(sa.select(runs.c.traceparent).where(runs.c.id == row["run_id"]))
        if row["run_id"] and tracing.enabled()
        else None
    )
    return Outgoing(
        delivery_id,
        url,
        encode_body(row["payload"]),
        secrets_,
        receiver=row["endpoint_id"] or url,
        event_type=row["event_type"],
        traceparent=traceparent,
    )


def claim_first_attempts(conn: sa.Connection, ids: Sequence[str], now: dt.datetime) -> set[str]:
    """The deliveries among ``ids`` whose first attempt nobody has taken yet,
    now leased to the caller (``gateway dispatch``, from the hand-over list).

    A delivery is written leased at its creation (``outbox.insert_delivery``),
    for the attempt handed over with the commit; a lease still equal to
    ``created_at`` is that one, untaken. One the dispatcher's scan took first
    (the hand-over waited past its lease) is not taken twice."""
    if not ids:
        return set()
    taken = conn.execute(
        deliveries.update()
        .where(
            deliveries.c.id.in_(ids),
            deliveries.c.status == DeliveryStatus.PENDING.value,
            deliveries.c.attempts == 0,
            deliveries.c.leased_at == deliveries.c.created_at,
        )
        .values(leased_at=now)
        .returning(deliveries.c.id)
    )
    return set(taken.scalars())


def release_leases(
    conn: sa.Connection, ids: Sequence[str], due_at: dt.datetime | None = None
) -> None:
    """Give back the leases of attempts taken and not sent (a dispatcher
    stopping, or one with more of a receiver's callbacks than it holds): due
    again for the next scan (at ``due_at``, when given), with no attempt
    counted lost (``lease_due`` leases a row with no lease as new)."""
    if not ids:
        return
    values: dict[str, Any] = {"leased_at": None}
    if due_at is not None:
        values["next_attempt_at"] = due_at
    conn.execute(
        deliveries.update()
        .where(deliveries.c.id.in_(ids), deliveries.c.status == DeliveryStatus.PENDING.value)
        .values(**values)
    )


def _due(lease_seconds: float, now: dt.datetime) -> tuple[sa.ColumnElement[bool], ...]:
    """Pending, due, and held by no one (never leased, or its lease ran out)."""
    expired = now - dt.timedelta(seconds=lease_seconds)
    return (
        deliveries.c.status == DeliveryStatus.PENDING.value,
        deliveries.c.next_attempt_at <= now,
        sa.or_(deliveries.c.leased_at.is_(None), deliveries.c.leased_at < expired),
    )


def any_due(conn: sa.Connection, lease_seconds: float, now: dt.datetime) -> bool:
    """Whether :func:`lease_due` would find anything: a read, which on SQLite
    takes no write lock, so an idle dispatcher's scans never stand in the
    way of the gateway's writes."""
    query = sa.select(deliveries.c.id).where(*_due(lease_seconds, now)).limit(1)
    return conn.execute(query).first() is not None


def lease_due(
    conn: sa.Connection,
    policy: RetryPolicy,
    lease_seconds: float,
    now: dt.datetime,
    limit: int,
    taken: Collection[str] | None = (),
) -> list[Outgoing | dict[str, Any]]:
    """Due attempts that no one holds, leased to the caller (``gateway
    dispatch``): retries whose time came, and attempts whose lease ran out
    (their sender stopped, or the hand-over was lost with Redis). On
    PostgreSQL, rows another dispatcher is leasing are skipped, not waited for.

    ``taken``: the first attempts a dispatcher took from the hand-over list
    without a claim (:func:`taken_key`); ``None`` when that is not known now
    (Redis does not answer), and then first attempts that look untaken wait
    for a scan that knows.

    Each is an :class:`Outgoing` to send, or what was done instead (a lost
    attempt recorded, a delivery of a disabled endpoint failed)."""
    query = (
        sa.select(
            deliveries.c.id,
            deliveries.c.attempts,
            deliveries.c.leased_at,
            deliveries.c.created_at,
        )
        .where(*_due(lease_seconds, now))
        .order_by(deliveries.c.next_attempt_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    out: list[Outgoing | dict[str, Any]] = []
    for row in conn.execute(query).all():
        # An attempt went out under the lease that ran out, unless it was the
        # first one's, handed over and never taken (its lease is its creation,
        # and no dispatcher marked it taken).
        first = row.attempts == 0 and row.leased_at == row.created_at
        if first and taken is None:
            continue
        went_out = row.leased_at is not None and not (first and row.id not in (taken or ()))
        out.append(lease_delivery(conn, row.id, policy, lease_seconds, now, retried=went_out))
    return out


class DeliveryDispatcher:
    """Queues callback attempts, prepares each, and records what came of it."""

    def __init__(self, *, db: Database, redis: ArqRedis, settings: Settings) -> None:
        self.db = db
        self.redis = redis
        self.settings = settings

    def handed_over(self, outgoing: Outgoing) -> dict[str, Any]:
        """What ``gateway dispatch`` takes: the delivery, its receiver, and
        its request signed now."""
        return {"id": outgoing.id, "receiver": outgoing.receiver, **self.prepared(outgoing)}

    def prepared(self, outgoing: Outgoing) -> dict[str, Any]:
        """What a sender needs for ``outgoing``: its request, signed now."""
        return {
            "send": True,
            "url": outgoing.url,
            "body": outgoing.body,
            "headers": webhook_headers(outgoing.id, outgoing.body, outgoing.secrets),
            "timeout": self.settings.webhook_timeout,
            "allowed_networks": list(self.settings.webhook_allowed_networks),
            "prepared_at": utcnow().timestamp(),
            "event_type": outgoing.event_type,
            "traceparent": outgoing.traceparent,
        }

    def first_attempts(self, outgoing: Sequence[Outgoing]) -> list[QueuedJob]:
        """The jobs of freshly committed deliveries' first attempts (none when
        ``gateway dispatch`` sends them: :meth:`hand_over`).

        Each carries headers signed now, which saves the worker a round trip
        for the first attempt; later attempts ask :meth:`prepare` again.
        """
        if self.settings.webhook_dispatcher:
            return []
        return [
            QueuedJob.of(
                DeliverWebhook(item.id, "schedule", self.prepared(item)),
                job_id=delivery_job_id(item.id, 0),
                queue_name=self.settings.delivery_queue_name,
                # Turns by receiver: one slow endpoint's backlog never keeps
                # another's callbacks waiting behind it (``gateway.queue``).
                fair_key=item.receiver,
            )
            for item in outgoing
        ]

    async def dispatch(self, outgoing: Sequence[Outgoing]) -> None:
        """Queue the first attempts of freshly committed deliveries."""
        try:
            await enqueue_jobs(self.redis, self.first_attempts(outgoing))
            await self.hand_over(outgoing)
        except (RedisError, OSError) as exc:
            log.warning(
                "could not queue %d delivery(ies) (the reconciler will): %s", len(outgoing), exc
            )

    async def hand_over(self, outgoing: Sequence[Outgoing]) -> None:
        """With ``WEBHOOK_DISPATCHER``: the first attempts of freshly committed
        deliveries, signed now, to ``gateway dispatch`` (one round trip). One
        that Redis loses is still due in the database, where the dispatcher
        finds it once its lease is over.

        :raises redis.exceptions.RedisError: Redis did not take them
        """
        if not self.settings.webhook_dispatcher or not outgoing:
            return
        await self.redis.rpush(  # type: ignore[misc]
            handover_key(self.settings),
            *(orjson.dumps(self.handed_over(item)) for item in outgoing),
        )

    async def _enqueue(
        self,
        delivery_id: str,
        *,
        trigger: str,
        step: int = 0,
        defer: float = 0.0,
        prepared: dict[str, Any] | None = None,
        retried: bool = False,
    ) -> None:
        job_id = (
            delivery_job_id(delivery_id, step)
            if trigger == "schedule"
            else f"webhook:{delivery_id}:resend:{new_id('r')}"
        )
        job = DeliverWebhook(delivery_id, trigger, prepared, retried)
        try:
            await enqueue_jobs(
                self.redis,
                [
                    QueuedJob.of(
                        job,
                        job_id=job_id,
                        queue_name=self.settings.delivery_queue_name,
                        defer_seconds=defer,
                    )
                ],
            )
        except (RedisError, OSError) as exc:
            log.warning("could not queue delivery %s (the reconciler will): %s", delivery_id, exc)

    async def resend(self, delivery_id: str) -> None:
        """Queue an extra attempt of a delivery, outside its schedule (same ``webhook-id``)."""
        await self._enqueue(delivery_id, trigger="resend")

    async def handover_backlog(self) -> tuple[int, float]:
        """What waits for ``gateway dispatch`` in the hand-over list: how many,
        and how long the oldest has waited in seconds (0 when none does)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(handover_key(self.settings))
            pipe.lindex(handover_key(self.settings), 0)
            count, oldest = await pipe.execute()
        if not oldest:
            return 0, 0.0
        try:
            since = float(orjson.loads(oldest)["prepared_at"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return int(count), 0.0
        return int(count), max(0.0, utcnow().timestamp() - since)

    async def requeue(self, delivery_id: str, *, step: int) -> None:
        """Queue the due attempt of a delivery whose job was lost (reconciler)."""
        await self._enqueue(delivery_id, trigger="schedule", step=step, retried=True)

    @property
    def lease_seconds(self) -> float:
        """How long an attempt may stay unreported before it counts as lost:
        its own deadline, and the reconciler's grace for the report to come
        back (what a lost job of any kind is given)."""
        return self.settings.webhook_timeout + self.settings.reconcile_grace

    async def prepare(
        self, delivery_id: str, trigger: str = "schedule", *, retried: bool = False
    ) -> dict[str, Any]:
        """What a worker should send for ``delivery_id`` now, signed afresh.

        A scheduled attempt whose predecessor went out and was never reported
        first records that one as ``attempt_lost``, and goes on from there.
        Only a ``retried`` job can have had one out: a job that runs for the
        first time may have waited its turn in a long queue (a slow receiver's
        backlog) past its lease, and that is no lost attempt.
        """
        policy = self.retry_policy()
        lease_seconds = self.lease_seconds

        def lease(conn: sa.Connection) -> dict[str, Any] | Outgoing:
            return lease_delivery(
                conn, delivery_id, policy, lease_seconds, utcnow(), trigger=trigger, retried=retried
            )

        result = await self.db.write(lease)
        if isinstance(result, Outgoing):
            return self.prepared(result)
        if result.get("recorded"):
            await self.count_attempts(["attempt_lost"])
            await self._after_record(delivery_id, result)
        return {"send": False, "reason": result["reason"]}

    def retry_policy(self) -> RetryPolicy:
        settings = self.settings
        return RetryPolicy(
            schedule=settings.webhook_retry_schedule,
            jitter=settings.webhook_retry_jitter,
            retry_after_max=settings.webhook_retry_after_max,
            disable_after=settings.webhook_disable_after,
        )

    async def record_attempt(self, report: DeliveryAttemptReport) -> dict[str, Any]:
        """Record one attempt (once, by its key) and decide what comes next.

        An answer that cannot be stored as it came (a driver's surprise) is
        stored without its excerpt, as ``record_failed``: the attempt is never
        lost, and the delivery moves on.
        """
        policy = self.retry_policy()
        try:
            outcome = await self.db.write_behind(record_attempt, policy, report, utcnow())
        except (sa.exc.DataError, sa.exc.StatementError, ValueError) as exc:
            if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
                raise  # the database is away: the worker retries the report
            log.error("attempt of %s could not be stored as it came: %s", report.delivery_id, exc)
            plain = report.model_copy(
                update={
                    "response_body": None,
                    "error_code": "record_failed",
                    "error": clean_text(f"the answer could not be stored: {exc}", 2000),
                }
            )
            outcome = await self.db.write_behind(record_attempt, policy, plain, utcnow())
        if outcome["recorded"]:
            await self.count_attempts([outcome_of(report)])
        await self._after_record(report.delivery_id, outcome)
        return {"recorded": outcome["recorded"], "next_attempt_in": outcome["next_attempt_in"]}

    async def record_attempts(
        self, reports: Sequence[DeliveryAttemptReport]
    ) -> list[dict[str, Any] | APIError]:
        """Record many attempts in one unit (:func:`record_attempts`: sets on
        PostgreSQL) and decide what comes next for each; an attempt refused
        (its delivery is not there) gets its error. A unit that fails on what
        a report holds goes again one report at a time, as
        :meth:`record_attempt` stores each."""
        if len(reports) < 2:
            return list(await asyncio.gather(*(self._one(r) for r in reports)))
        try:
            outcomes = await self.db.write_behind(
                record_attempts, self.retry_policy(), reports, utcnow()
            )
        except (sa.exc.DataError, sa.exc.StatementError, ValueError) as exc:
            if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
                raise
            return list(await asyncio.gather(*(self._one(r) for r in reports)))
        answers: list[dict[str, Any] | APIError] = []
        await self.count_attempts(
            [
                outcome_of(report)
                for report, outcome in zip(reports, outcomes, strict=True)
                if not isinstance(outcome, APIError) and outcome["recorded"]
            ]
        )
        for report, outcome in zip(reports, outcomes, strict=True):
            if isinstance(outcome, APIError):
                answers.append(outcome)
                continue
            await self._after_record(report.delivery_id, outcome)
            answers.append(
                {"recorded": outcome["recorded"], "next_attempt_in": outcome["next_attempt_in"]}
            )
        return answers

    async def count_attempts(self, outcomes: Sequence[str]) -> None:
        """Count recorded attempts by outcome in Redis (:func:`attempt_counts_key`),
        in one round trip. A count Redis misses is lost, never the attempt."""
        if not outcomes:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for outcome, count in collections.Counter(outcomes).items():
                    pipe.hincrby(attempt_counts_key(self.settings), outcome, count)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not count %d attempt(s) in Redis: %s", len(outcomes), exc)

    async def _one(self, report: DeliveryAttemptReport) -> dict[str, Any] | APIError:
        try:
            return await self.record_attempt(report)
        except APIError as exc:
            return exc

    async def _after_record(self, delivery_id: str, outcome: Mapping[str, Any]) -> None:
        # ``gateway dispatch`` reads due retries from the database itself.
        if outcome["next_attempt_in"] is not None and not self.settings.webhook_dispatcher:
            await self._enqueue(
                delivery_id,
                trigger="schedule",
                step=outcome["step"],
                defer=outcome["next_attempt_in"],
            )
