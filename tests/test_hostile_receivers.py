"""Receivers that misbehave: every delivery still moves forward.

Every try ends as a recorded attempt (an answer, or an ``error_code`` saying
why there was none) within ``WEBHOOK_TIMEOUT`` and a few seconds, the retry
schedule ends every delivery, and no ``webhook-id`` is sent more often than
the schedule allows. On both databases.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import RETRY_SCHEDULE, Stack
from tests.helpers import wait_until
from tests.hostile import BEHAVIOURS, HostileReceiver
from tests.test_webhooks import App, deliveries_of_run

#: The tests' WEBHOOK_TIMEOUT (conftest's launch_stack).
WEBHOOK_TIMEOUT = 2.0
SCHEDULE_LENGTH = len(RETRY_SCHEDULE.split(","))
ERROR_CODES = {"timeout", "connection_error", "address_refused", "send_failed"}


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileReceiver]:
    server = HostileReceiver().start()
    yield server
    server.stop()


def _when(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _register(app: App, url: str) -> dict[str, Any]:
    with app.client() as client:
        answer = client.post("/api/v1/webhooks", json={"url": url, "events": ["run.completed"]})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def test_every_delivery_to_a_hostile_receiver_ends_with_recorded_attempts(
    stack: Stack, hostile: HostileReceiver
) -> None:
    app = App(stack)
    urls = {path: hostile.url(path) for path in BEHAVIOURS}
    # A host that is not ASCII: an internationalized name (normalised, then
    # it does not resolve). A look-alike fullwidth "localhost" is localhost,
    # whose ::1 this stack does not allow: refused at registration.
    urls["idn"] = "http://bücher.invalid/hook"
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in "localhost")
    with app.client() as client:
        refused = client.post(
            "/api/v1/webhooks", json={"url": hostile.url("/fullwidth", host=fullwidth)}
        )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "url_not_allowed"
    endpoints = {name: _register(app, url) for name, url in urls.items()}
    assert endpoints["idn"]["url"] == "http://xn--bcher-kva.invalid/hook"
    by_endpoint = {e["id"]: name for name, e in endpoints.items()}

    run = app.run("echo", {"to": "strangers"})

    def settled() -> list[dict[str, Any]] | None:
        found = deliveries_of_run(app, run["id"])
        done = len(found) == len(urls) and all(d["status"] != "pending" for d in found)
        return found if done else None

    deliveries = wait_until(settled, timeout=90, interval=0.25, what="every delivery to end")
    for delivery in deliveries:
        name = by_endpoint[delivery["endpoint_id"]]
        attempts = delivery["attempts"]
        assert attempts, (name, delivery)
        first = _when(attempts[0]["at"]) - _when(delivery["created_at"])
        assert first.total_seconds() < WEBHOOK_TIMEOUT + 5, (name, first, attempts[0])
        assert len(attempts) <= SCHEDULE_LENGTH, (name, attempts)
        for attempt in attempts:
            if attempt["status_code"] is None:
                assert attempt["error_code"] in ERROR_CODES, (name, attempt)
                assert attempt["error"], (name, attempt)
            assert "\x00" not in (attempt["response_body"] or ""), (name, attempt)
    outcome = {by_endpoint[d["endpoint_id"]]: d for d in deliveries}

    # What each receiver's attempts say.
    nul = outcome["/nul"]
    assert nul["status"] == "delivered"
    assert nul["attempts"][0]["response_body"] == "ok\ufffdstill ok\ufffd"
    bad_utf8 = outcome["/invalid-utf8"]
    assert bad_utf8["status"] == "delivered"
    assert "\ufffd" in bad_utf8["attempts"][0]["response_body"]
    # Headers came in time: the status stands, the body is cut at the deadline.
    trickle = outcome["/trickle"]["attempts"][0]
    assert trickle["status_code"] == 200 and len(trickle["response_body"]) < 600
    for name in ("/slow-headers", "/hang"):
        assert outcome[name]["status"] == "failed"
        assert {a["error_code"] for a in outcome[name]["attempts"]} == {"timeout"}
        if len(outcome[name]["attempts"]) < SCHEDULE_LENGTH:
            # Every try waits out the timeout: on a busy machine the endpoint
            # fails longer than DISABLE_AFTER before its schedule ends, and is
            # disabled, which ends the delivery first.
            with app.client() as client:
                endpoint = client.get(f"/api/v1/webhooks/{outcome[name]['endpoint_id']}").json()
            assert not endpoint["enabled"], (name, outcome[name])
            assert "failing without a success" in endpoint["disabled_reason"]
        else:
            assert len(outcome[name]["attempts"]) == SCHEDULE_LENGTH
    assert {a["status_code"] for a in outcome["/redirect"]["attempts"]} == {302}
    assert {a["error_code"] for a in outcome["/reset"]["attempts"]} == {"connection_error"}
    assert {a["error_code"] for a in outcome["/garbage"]["attempts"]} == {"connection_error"}
    huge = outcome["/huge"]
    assert huge["status"] == "delivered" and len(huge["attempts"][0]["response_body"]) == 2048
    assert outcome["/ok"]["status"] == "delivered"
    assert {a["error_code"] for a in outcome["idn"]["attempts"]} == {"address_refused"}
    assert "xn--bcher-kva.invalid" in outcome["idn"]["attempts"][0]["error"]
    assert "fullwidth" not in outcome

    # No webhook-id came more often than the schedule allows, and none came
    # from a delivery that had ended.
    sent = Counter(a.webhook_id for a in hostile.arrivals if a.webhook_id is not None)
    ours = {d["id"] for d in deliveries}
    assert all(sent[i] <= SCHEDULE_LENGTH for i in ours), sent


def test_a_deleted_endpoints_queued_tries_stop(stack: Stack, hostile: HostileReceiver) -> None:
    app = App(stack)
    endpoint = _register(app, hostile.url("/hang"))
    before = len(hostile.arrivals_to("/hang"))
    run = app.run("echo", {"to": "a receiver about to go"})
    hostile.wait_for(lambda arrivals: len([a for a in arrivals if a.path == "/hang"]) > before)
    with app.client() as client:
        assert client.delete(f"/api/v1/webhooks/{endpoint['id']}").status_code == 204
    [delivery] = deliveries_of_run(app, run["id"])
    assert delivery["status"] == "failed" and delivery["last_error"] == "endpoint deleted"
    arrived = len(hostile.arrivals_to("/hang"))
    # An absence takes time to see: the schedule (0, 0.3, 0.6, 1 s after each
    # 2 s timeout) would have sent two more tries within these seconds.
    time.sleep(WEBHOOK_TIMEOUT + 2.5)
    assert len(hostile.arrivals_to("/hang")) == arrived
    [delivery] = deliveries_of_run(app, run["id"])
    assert delivery["status"] == "failed"
    assert len(delivery["attempts"]) <= 1


def test_a_hanging_receiver_never_holds_up_task_runs(
    single_slot_stack: Stack, hostile: HostileReceiver
) -> None:
    """Callback attempts have slots of their own: with one task slot and a
    receiver that never answers, runs go on while the attempt hangs."""
    app = App(single_slot_stack)
    _register(app, hostile.url("/hang"))
    before = len(hostile.arrivals_to("/hang"))
    first = app.run("echo", {"n": 1})
    hostile.wait_for(lambda arrivals: len([a for a in arrivals if a.path == "/hang"]) > before)
    # The attempt is out and hanging; the one task slot is free all the same.
    second = app.run("echo", {"n": 2})
    assert second["status"] == "COMPLETED"
    [delivery] = deliveries_of_run(app, first["id"])
    assert delivery["attempts"] == [], "the attempt should still be hanging"
