"""Callbacks sent by the workers (``WEBHOOK_DISPATCHER=false``).

Each attempt is an arq job on the workers' deliveries queue, reported back to
the gateway. The callback suite of ``tests/test_webhooks.py`` runs here
unchanged on a stack without a dispatcher (its test functions are imported,
and take this module's ``app``); then what only this path has: turns by
receiver in the deliveries queue, a re-run job recording its predecessor's
attempt lost, and a job that a dead worker left marked in progress.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, _backend_of, _redis_db, launch_stack
from tests.helpers import db_call, wait_until
from tests.receiver import Answer, Receiver
from tests.test_webhooks import (  # noqa: F401  (collected here, on this module's stack)
    App,
    test_410_gone_disables_the_endpoint_until_patched,
    test_500s_then_200_with_the_same_webhook_id_and_every_attempt_logged,
    test_a_runs_callback_arrives_signed_and_verifiable,
    test_a_timeout_and_a_redirect_are_failures_and_redirects_are_not_followed,
    test_an_endpoint_failing_longer_than_the_span_is_disabled,
    test_callback_url_of_one_run_is_signed_with_the_project_secret,
    test_event_and_task_filters,
    test_private_addresses_are_refused_at_registration_and_at_send_time,
    test_receiver_down_for_a_while_then_up_gets_the_message,
    test_recover_sends_pending_deliveries_now_when_asked,
    test_resend_and_recover,
    test_retry_after_is_honoured_within_bounds,
    test_rotation_signs_with_both_secrets_then_only_the_new_one,
)


@pytest.fixture(scope="module")
def workers_send(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A gateway and a worker, no dispatcher: the workers send callbacks."""
    with launch_stack(
        "workers-send",
        databases.new("workers_send"),
        f"{redis_server.url}/{_redis_db(database_url, 21)}",
        tmp_path_factory.mktemp("logs-workers-send"),
        WEBHOOK_DISPATCHER="false",
    ) as stack:
        assert stack.dispatcher is None
        yield stack


@pytest.fixture
def app(workers_send: Stack) -> App:
    return App(workers_send)


def test_a_slow_receivers_backlog_delays_no_other_receiver_and_loses_no_attempt(
    databases: Any,
    database_url: str,
    redis_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
    receiver: Receiver,
) -> None:
    """Callback slots are taken in turns by receiver: another project's
    callback goes out next, not behind three slow endpoints' backlog, and
    attempts that waited their turn are sent, never recorded as lost. (On
    SQLite only: the turns are Redis's, the same whatever the database.)"""
    from gateway.auth.keys import hash_api_key

    if _backend_of(database_url) != "sqlite":
        pytest.skip("the turns are Redis's: one database is enough")

    slow = [f"/slow-{secrets.token_hex(3)}-{n}" for n in range(3)]
    fast = f"/fast-{secrets.token_hex(3)}"
    for path in slow:
        receiver.default(path, Answer(delay=0.4))
    with launch_stack(
        "fair-callbacks",
        databases.new("fair_callbacks"),
        f"{redis_server.url}/{_redis_db(database_url, 11)}",
        tmp_path_factory.mktemp("logs-fair-callbacks"),
        WEBHOOK_DISPATCHER="false",
        WEBHOOK_CONCURRENCY="4",
        # Every attempt that waits past this lease counted as lost, before.
        WEBHOOK_TIMEOUT="1",
        RECONCILE_GRACE="1",
    ) as stack:
        flooder, other = (stack.new_key(f"fair-{n}-{secrets.token_hex(2)}") for n in range(2))
        with stack.client(flooder) as client:
            for path in slow:
                made = client.post(
                    "/api/v1/webhooks",
                    json={"url": receiver.url(path), "events": ["run.completed"]},
                )
                assert made.status_code == 201, made.text
            for n in range(20):
                client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": n}})
        with stack.client(other) as client:
            made = client.post(
                "/api/v1/webhooks", json={"url": receiver.url(fast), "events": ["run.completed"]}
            )
            assert made.status_code == 201
            wait_until(
                lambda: sum(len(receiver.calls_to(p)) for p in slow) >= 8,
                what="the slow backlog to be under way",
            )
            before = sum(len(receiver.calls_to(p)) for p in slow)
            client.post("/api/v1/tasks/echo/trigger", json={"payload": {"other": True}})
            receiver.wait_calls(fast, 1)
            overtaking = sum(len(receiver.calls_to(p)) for p in slow) - before
        # At most the slots in flight, and those taken already, went first.
        assert overtaking <= 8, overtaking

        # Every slow delivery ends delivered, and none with an attempt recorded
        # lost: waiting in the queue past the lease is no lost attempt.
        def all_delivered() -> list[dict[str, Any]] | None:
            rows = stack.query(
                "SELECT d.status, d.attempts FROM deliveries d JOIN api_keys k "
                "ON k.project_id = d.project_id WHERE k.key_hash = :h",
                h=hash_api_key(flooder),
            )
            done = len(rows) == 60 and all(r[0] == "delivered" for r in rows)
            return [{"status": r[0], "attempts": r[1]} for r in rows] if done else None

        wait_until(all_delivered, timeout=60, what="every slow delivery")
        # None recorded lost. (A first attempt that timed out on a machine
        # under load, the receiver's 0.4 s answer past WEBHOOK_TIMEOUT, is
        # retried as any would be, and is not what this checks.)
        codes = stack.query(
            "SELECT a.error_code FROM delivery_attempts a JOIN deliveries d "
            "ON d.id = a.delivery_id JOIN api_keys k ON k.project_id = d.project_id "
            "WHERE k.key_hash = :h",
            h=hash_api_key(flooder),
        )
        assert "attempt_lost" not in {c[0] for c in codes}, codes
        assert sum(1 for c in codes if c[0] is None) == 60, codes


def test_only_a_retried_job_records_its_predecessor_lost(
    workers_send: Stack, receiver: Receiver
) -> None:
    """A first try that waited its turn past its lease is sent; a job run
    again (its worker died on it) first records the attempt it may have sent."""
    from db.models import Delivery
    from jobs.protocol import PREPARE_PATH, sign_request
    from tests.conftest import TEST_SECRET

    deliveries = Delivery.__table__  # type: ignore[attr-defined]

    path = f"/lease-{secrets.token_hex(3)}"
    run = workers_send.run("echo", {"lease": True}, callback_url=receiver.url(path))
    receiver.wait_calls(path, 1)
    [(delivery_id,)] = workers_send.query(
        "SELECT id FROM deliveries WHERE run_id = :r", r=run["id"]
    )
    # Its attempt is recorded (the report comes after the call) before the
    # row is set back as a worker would find it after a long wait.
    wait_until(
        lambda: (
            workers_send.query("SELECT status FROM deliveries WHERE id = :d", d=delivery_id)[0][0]
            == "delivered"
        ),
        what="the attempt to be recorded",
    )

    def prepare(retried: bool) -> dict[str, Any]:
        # The delivery as a worker finds it after a long wait: pending, its
        # lease taken an hour ago.
        an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        db_call(
            workers_send.database_url,
            lambda conn: conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .values(status="pending", leased_at=an_hour_ago, attempts=1)
            ),
            write=True,
        )
        body = json.dumps({"delivery_id": delivery_id, "retried": retried}).encode()
        answer = httpx.post(
            workers_send.base_url + PREPARE_PATH,
            content=body,
            headers={
                "content-type": "application/json",
                "gateway-signature": sign_request(TEST_SECRET, "POST", PREPARE_PATH, "", body),
            },
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    sent = prepare(retried=False)
    assert sent["send"] is True, sent
    lost = prepare(retried=True)
    assert lost["send"] is False and lost["reason"] == "the last attempt was lost"
    codes = [
        r[0]
        for r in workers_send.query(
            "SELECT error_code FROM delivery_attempts WHERE delivery_id = :d ORDER BY id",
            d=delivery_id,
        )
    ]
    assert codes[-1] == "attempt_lost" and codes.count("attempt_lost") == 1


def test_a_callback_job_a_dead_worker_marked_in_progress_goes_out_soon(
    workers_send: Stack, receiver: Receiver
) -> None:
    """A worker killed between taking a callback job and finishing it leaves
    arq's in-progress mark on for the job's timeout and 10 s (72 s here): no
    worker takes the job meanwhile. Once the mark is older than the attempt's
    lease, the reconciler takes it off, and the queued job runs at once."""
    import asyncio

    import redis
    from arq.connections import create_pool

    from db.ids import new_id
    from db.models import Delivery
    from gateway.queue import QueuedJob, enqueue_jobs
    from jobs.contract import DeliverWebhook
    from jobs.protocol import delivery_job_id, redis_settings

    deliveries = Delivery.__table__  # type: ignore[attr-defined]
    path = f"/marked-{secrets.token_hex(3)}"
    delivery_id = new_id("msg")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    job_id = delivery_job_id(delivery_id, 0)
    # The mark as arq sets it (WEBHOOK_TIMEOUT 2 + 60 + 10 s), 5 s ago: older
    # than the lease (WEBHOOK_TIMEOUT + RECONCILE_GRACE, 4 s), so no attempt
    # can still be out under it. Set before the row exists, so the job is
    # marked whoever queues it.
    with redis.Redis.from_url(workers_send.redis_url) as client:
        client.set(f"arq:in-progress:{job_id}", b"1", px=(72 - 5) * 1000)
    db_call(
        workers_send.database_url,
        lambda conn: conn.execute(
            deliveries.insert().values(
                id=delivery_id,
                project_id=workers_send.project_id,
                url=receiver.url(path),
                event_type="run.completed",
                payload={"type": "run.completed", "data": {"id": "run_marked"}},
                status="pending",
                attempts=0,
                schedule_step=0,
                next_attempt_at=long_ago,
                leased_at=long_ago,
                created_at=long_ago,
                updated_at=long_ago,
            )
        ),
        write=True,
    )

    async def enqueue() -> None:
        pool = await create_pool(redis_settings(workers_send.redis_url))
        try:
            job = DeliverWebhook(delivery_id, "schedule", None, False)
            queued = QueuedJob.of(job, job_id=job_id, queue_name="gateway:queue:deliveries")
            # False when the reconciler, which sees a pending delivery whose
            # lease ran out, queued the same job first: either way it waits.
            await enqueue_jobs(pool, [queued])
            assert await pool.exists(f"arq:job:{job_id}", f"arq:result:{job_id}")
        finally:
            await pool.aclose()

    asyncio.run(enqueue())
    [call] = receiver.wait_calls(path, 1, timeout=20)
    assert call.headers["webhook-id"] == delivery_id
    wait_until(
        lambda: (
            workers_send.query("SELECT status FROM deliveries WHERE id = :d", d=delivery_id)[0][0]
            == "delivered"
        ),
        what="the delivery to be recorded delivered",
    )
