"""Rotating ``GATEWAY_SECRET_KEY`` under load, across two gateways and a worker.

The procedure of docs/operations.md#rotating-the-secret-key, step by step,
with triggers flowing through both gateways the whole time: first every
gateway learns the new key (``GATEWAY_PREVIOUS_SECRET_KEYS``) while still
signing with the old one; then each gateway and the worker sign with the new
key, the old one kept as previous; last the old key is dropped. Throughout,
no run and no callback is lost, and what was handed out before (an artifact
link, a waitpoint URL, a public access token, a dashboard session) keeps
working while the old key is listed; once it is dropped, they are refused.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix

from gateway.cli.embedded_redis import EmbeddedRedis, free_port
from jobs.protocol import delivery_job_id
from tests.conftest import TEST_SECRET, Databases, Stack, _redis_db, launch_stack
from tests.helpers import Process, dashboard_session, wait_http_ok
from tests.receiver import Receiver
from tests.test_tasks import data_uri, download, quadrants

OLD, NEW = TEST_SECRET, "rotated-" + secrets.token_urlsafe(24)


class Pair:
    """Gateway A (the stack's, which the worker reports to) and gateway B."""

    def __init__(self, stack: Stack, logs: Path) -> None:
        self.stack = stack
        self.logs = logs
        self.b_port = free_port()
        self.b = self._gateway("gateway-b", self.b_port, {})
        #: How each stopped process ended (-9: killed, its stop took too long).
        self.exits: list[tuple[str, int | None]] = []

    @property
    def urls(self) -> list[str]:
        return [self.stack.base_url, f"http://127.0.0.1:{self.b_port}"]

    def _gateway(self, name: str, port: int, keys: dict[str, str]) -> Process:
        env = {**self.stack.env, "PORT": str(port), **keys}
        process = Process(name, ["-m", "gateway", "web"], env, self.logs).start()
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", process)
        return process

    def restart_a(self, **keys: str) -> None:
        self.exits.append(("gateway", self.stack.gateway.stop()))
        self.stack.gateway = self._gateway("gateway", int(self.urls[0].rsplit(":", 1)[1]), keys)

    def restart_b(self, **keys: str) -> None:
        self.exits.append(("gateway-b", self.b.stop()))
        self.b = self._gateway("gateway-b", self.b_port, keys)

    def restart_worker(self, **keys: str) -> None:
        self.exits.append(("worker", self.stack.worker.stop()))
        self.stack.worker = Process(
            "worker", ["-m", "gateway", "worker"], {**self.stack.env, **keys}, self.logs
        ).start()


@pytest.fixture
def pair(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pair]:
    logs = tmp_path_factory.mktemp("logs-rotation")
    with launch_stack(
        "rotation",
        databases.new("rotation"),
        f"{redis_server.url}/{_redis_db(database_url, 13)}",
        logs,
    ) as stack:
        pair = Pair(stack, logs)
        try:
            yield pair
        finally:
            pair.b.stop()


class Load:
    """Triggers with a callback, round robin over the gateways, until stopped.

    A gateway being restarted refuses the connection; the same trigger (same
    idempotency key) then goes to the other one, as a balancer would send it.
    """

    def __init__(self, pair: Pair, callback: str) -> None:
        self.pair = pair
        self.callback = callback
        self.run_ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        headers = {"authorization": f"Bearer {self.pair.stack.api_key}"}
        with httpx.Client(headers=headers, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                body = {
                    "payload": {"n": n},
                    "options": {"idempotency_key": f"load-{n}", "callback_url": self.callback},
                }
                for attempt in range(40):
                    url = self.pair.urls[(n + attempt) % 2]
                    try:
                        answer = client.post(f"{url}/api/v1/tasks/echo/trigger", json=body)
                    except httpx.TransportError:
                        self._stop.wait(0.05)
                        continue
                    assert answer.status_code in (200, 202), answer.text
                    self.run_ids.append(answer.json()["id"])
                    break
                else:
                    raise AssertionError(f"trigger {n}: no gateway answered")
                n += 1
                self._stop.wait(0.02)  # a steady stream, not a flood to drain

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def _crop(stack: Stack, url: str) -> dict[str, Any]:
    image = {"image": data_uri(quadrants()), "x": 0, "y": 0, "width": 50, "height": 50}
    with httpx.Client(
        base_url=url, headers={"authorization": f"Bearer {stack.api_key}"}, timeout=30
    ) as client:
        accepted = client.post("/api/v1/tasks/crop-image/trigger", json={"payload": image})
        assert accepted.status_code == 202, accepted.text
        run = client.get(f"/api/v1/runs/{accepted.json()['id']}", params={"wait": 30}).json()
    assert run["status"] == "COMPLETED", run
    # The trigger's answer alone carries the run's public access token.
    return {**run, "public_access_token": accepted.json()["public_access_token"]}


def _waitpoint(stack: Stack) -> dict[str, Any]:
    with stack.client() as client:
        made = client.post("/api/v1/waitpoints", json={})
    assert made.status_code in (200, 201), made.text
    return dict(made.json())


def _at(url: str, base: str) -> str:
    """``url`` (a link the gateways hand out) sent to the gateway at ``base``."""
    return base + "/" + url.split("/", 3)[3]


def _signed_in(client: httpx.Client) -> bool:
    return client.get("/dashboard/runs").status_code == 200


def test_rotating_the_secret_key_under_load_loses_nothing(pair: Pair, receiver: Receiver) -> None:
    stack = pair.stack
    path = f"/rotation-{secrets.token_hex(4)}"
    # Handed out under the old key.
    crop = _crop(stack, pair.urls[0])
    artifact = download(crop["output"]["url"]).content
    kept_waitpoint, spent_waitpoint = _waitpoint(stack), _waitpoint(stack)
    session = dashboard_session(pair.urls[1], stack.api_key)
    try:
        _rotate(pair, receiver, path, session, crop, artifact, kept_waitpoint, spent_waitpoint)
    finally:
        session.close()


def _in_redis(stack: Stack, delivery_ids: list[str]) -> list[str]:
    """What Redis holds of each delivery's first attempt: its job, its
    in-progress mark (with the milliseconds it has left), its result and its
    place in the queue, for a diagnosis."""
    queue = f"{stack.env.get('QUEUE_NAME', 'gateway:queue')}:deliveries"
    said = []
    with redis.Redis.from_url(stack.redis_url) as client:
        for delivery_id in delivery_ids:
            job = delivery_job_id(delivery_id, 0)
            said.append(
                f"redis: {job}: job={client.exists(job_key_prefix + job)}"
                f" in_progress_pttl={client.pttl(in_progress_key_prefix + job)}"
                f" result={client.exists(result_key_prefix + job)}"
                f" score={client.zscore(queue, job)}"
            )
    return said


def _rotate(
    pair: Pair,
    receiver: Receiver,
    path: str,
    session: httpx.Client,
    crop: dict[str, Any],
    artifact: bytes,
    kept_waitpoint: dict[str, Any],
    spent_waitpoint: dict[str, Any],
) -> None:
    stack = pair.stack
    a, b = pair.urls
    link, public_token = crop["output"]["url"], crop["public_access_token"]
    assert _signed_in(session)

    with Load(pair, receiver.url(path)) as load:
        # 1. Every gateway accepts the new key, still signing with the old one.
        pair.restart_a(GATEWAY_PREVIOUS_SECRET_KEYS=NEW)
        pair.restart_b(GATEWAY_PREVIOUS_SECRET_KEYS=NEW)
        # 2. Gateway A signs with the new key. What it hands out now works
        # at B, which has not switched yet.
        pair.restart_a(GATEWAY_SECRET_KEY=NEW, GATEWAY_PREVIOUS_SECRET_KEYS=OLD)
        fresh = _crop(stack, a)
        assert download(_at(fresh["output"]["url"], b)).status_code == 200
        fresh_waitpoint = _waitpoint(stack)
        assert httpx.post(_at(fresh_waitpoint["url"], b), json={"at": "b"}).status_code == 200
        # The worker still signs its reports with the old key, and A takes them.
        assert stack.run("echo", {"worker": "old key"})["status"] == "COMPLETED"
        pair.restart_worker(GATEWAY_SECRET_KEY=NEW)
        pair.restart_b(GATEWAY_SECRET_KEY=NEW, GATEWAY_PREVIOUS_SECRET_KEYS=OLD)
        assert stack.run("echo", {"worker": "new key"})["status"] == "COMPLETED"

    # Nothing was lost: every run is final once, and its callback came.
    assert len(load.run_ids) >= 20, len(load.run_ids)
    with stack.client() as client:
        finals = [
            client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
            for run_id in load.run_ids
        ]
    assert {run["status"] for run in finals} == {"COMPLETED"}
    try:
        calls = receiver.wait_for(
            lambda calls: {c.json()["data"]["id"] for c in calls} >= set(load.run_ids), path, 60
        )
    except AssertionError:
        got = {c.json()["data"]["id"] for c in receiver.calls_to(path)}
        missing = sorted(set(load.run_ids) - got)
        rows = stack.query(
            "SELECT id, run_id, status, attempts, last_error, next_attempt_at, leased_at"
            " FROM deliveries WHERE run_id IN :ids",
            ids=tuple(missing[:20]),
        )
        said = _in_redis(stack, [row[0] for row in rows])
        for log_file in sorted(pair.logs.glob("*.log")):
            for line in log_file.read_text(errors="replace").splitlines():
                if any(row[0] in line or row[1] in line for row in rows) or (
                    (" WARNING " in line or " ERROR " in line)
                    and "gateway unreachable for report" not in line  # the restarts' own
                ):
                    said.append(f"{log_file.name}: {line[:300]}")
        raise AssertionError(
            f"{len(missing)} callbacks missing: {rows}\nexits: {pair.exits}\n" + "\n".join(said)
        ) from None
    assert {c.json()["data"]["id"] for c in calls} == set(load.run_ids)

    # What was handed out under the old key still works, at either gateway.
    for base in (a, b):
        assert download(_at(link, base)).content == artifact
        opened = httpx.get(f"{base}/api/v1/runs/{crop['id']}", params={"token": public_token})
        assert opened.status_code == 200 and opened.json()["id"] == crop["id"]
    assert _signed_in(session)
    assert httpx.post(_at(kept_waitpoint["url"], a), json={"at": "a"}).status_code == 200

    # 3. The old key dropped: what it signed is refused; the new key's work is not.
    pair.restart_a(GATEWAY_SECRET_KEY=NEW)
    assert download(_at(link, a)).status_code == 403
    assert download(_at(fresh["output"]["url"], a)).status_code == 200
    refused = httpx.post(_at(spent_waitpoint["url"], a), json={})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_token"
    closed = httpx.get(f"{a}/api/v1/runs/{crop['id']}", params={"token": public_token})
    assert closed.status_code == 401
    with httpx.Client(base_url=a, cookies=session.cookies, timeout=20) as gone:
        assert not _signed_in(gone)
    with httpx.Client(base_url=a, timeout=20) as client:
        kept = client.get(
            f"/api/v1/runs/{fresh['id']}", params={"token": fresh["public_access_token"]}
        )
    assert kept.status_code == 200
