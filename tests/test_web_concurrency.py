"""Several uvicorn workers behind one ``gateway web`` (``WEB_CONCURRENCY=2``) stay correct.

Triggers, reports and long-polls land on either process; idempotency keys,
compare-and-set transitions, group commit and the reconciler's lock must hold
across them as they do across gateway hosts.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, _redis_db, launch_stack
from tests.helpers import wait_until
from tests.receiver import Receiver


@pytest.fixture(scope="module")
def two_web_workers(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    with launch_stack(
        "web2",
        databases.new("web2"),
        f"{redis_server.url}/{_redis_db(database_url, 6)}",
        tmp_path_factory.mktemp("logs-web2"),
        WEB_CONCURRENCY="2",
        DATA_DIR=str(tmp_path_factory.mktemp("data-web2")),
    ) as stack:
        yield stack


def test_an_idempotency_key_makes_one_run_across_web_workers(two_web_workers: Stack) -> None:
    stack = two_web_workers

    async def trigger_all() -> list[httpx.Response]:
        headers = {"authorization": f"Bearer {stack.api_key}"}
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=stack.base_url, headers=headers, limits=limits, timeout=30
        ) as client:
            body = {"payload": {"once": True}, "options": {"idempotency_key": "across-workers"}}
            return await asyncio.gather(
                *(client.post("/api/v1/tasks/echo/trigger", json=body) for _ in range(100))
            )

    answers = asyncio.run(trigger_all())
    assert {a.status_code for a in answers} <= {200, 202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.status_code == 202 for a in answers) == 1


def test_every_run_ends_once_with_one_callback_across_web_workers(
    two_web_workers: Stack, receiver: Receiver
) -> None:
    stack = two_web_workers
    key = stack.new_key("web2-callbacks")
    path = f"/web2-{secrets.token_hex(4)}"
    with stack.client(key) as client:
        endpoint = client.post(
            "/api/v1/webhooks", json={"url": receiver.url(path), "events": ["run.completed"]}
        ).json()
    receiver.verify_with(path, endpoint["secret"])

    async def trigger_and_wait() -> list[dict[str, object]]:
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            base_url=stack.base_url, headers=headers, timeout=60
        ) as client:
            triggered = await asyncio.gather(
                *(
                    client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": n}})
                    for n in range(150)
                )
            )
            ids = [t.json()["id"] for t in triggered]
            finals = await asyncio.gather(
                *(client.get(f"/api/v1/runs/{i}", params={"wait": 30}) for i in ids)
            )
            return [f.json() for f in finals]

    finals = asyncio.run(trigger_and_wait())
    assert {f["status"] for f in finals} == {"COMPLETED"}
    ids = {str(f["id"]) for f in finals}
    calls = receiver.wait_calls(path, len(ids), timeout=60)
    assert all(c.verified_by for c in calls)
    called = Counter(c.json()["data"]["id"] for c in calls)
    assert set(called) == ids

    def settled() -> bool:
        # A callback may be resent (at least once), but each run has one
        # message, and each run ended once.
        rows = stack.query(
            "SELECT run_id, COUNT(*) FROM deliveries WHERE endpoint_id = :e GROUP BY run_id",
            e=endpoint["id"],
        )
        return len(rows) == len(ids) and all(r[1] == 1 for r in rows)

    wait_until(settled, what="one delivery per run")
    finals_logged = stack.query(
        "SELECT run_id, COUNT(*) FROM run_transitions WHERE to_status = 'COMPLETED'"
        " GROUP BY run_id HAVING COUNT(*) > 1"
    )
    assert finals_logged == []
