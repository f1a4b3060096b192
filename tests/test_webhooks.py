"""Callbacks over real processes: a gateway, a worker and a receiver on loopback."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.conftest import Stack
from tests.helpers import db_call, wait_until
from tests.receiver import Answer, Receiver
from webhooks import verify
from webhooks.signing import sign_webhook


class App:
    """One test's own project on the shared stack, so endpoints never mix."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.key = stack.new_key(f"webhooks-{secrets.token_hex(4)}")
        self.project_id = stack.query(
            "SELECT project_id FROM api_keys WHERE key_hash = :h", h=_hash(self.key)
        )[0][0]

    def client(self) -> httpx.Client:
        return self.stack.client(self.key)

    def run(self, task: str, payload: Any = None, **options: Any) -> dict[str, Any]:
        return self.stack.run(task, payload, key=self.key, **options)


def _hash(key: str) -> str:
    from gateway.auth.keys import hash_api_key

    return hash_api_key(key)


@pytest.fixture
def app(stack: Stack) -> App:
    return App(stack)


def fresh_path() -> str:
    return f"/hooks/{secrets.token_hex(6)}"


def register(app: App, receiver: Receiver, path: str, **fields: Any) -> dict[str, Any]:
    with app.client() as client:
        response = client.post("/api/v1/webhooks", json={"url": receiver.url(path), **fields})
    assert response.status_code == 201, response.text
    endpoint = response.json()
    receiver.verify_with(path, endpoint["secret"])
    return dict(endpoint)


def deliveries_of_run(app: App, run_id: str) -> list[dict[str, Any]]:
    with app.client() as client:
        response = client.get(f"/api/v1/runs/{run_id}/deliveries")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def wait_delivered(app: App, run_id: str) -> dict[str, Any]:
    """The run's one delivery, once it is marked delivered."""

    def settled() -> dict[str, Any] | None:
        [delivery] = deliveries_of_run(app, run_id)
        return delivery if delivery["status"] == "delivered" else None

    return wait_until(settled, what="the delivery to succeed")


def endpoint_deliveries(app: App, endpoint_id: str) -> list[dict[str, Any]]:
    with app.client() as client:
        response = client.get(f"/api/v1/webhooks/{endpoint_id}/deliveries")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def test_the_spec_test_vector_holds_for_our_signer() -> None:
    signature = sign_webhook(
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        '{"test": 2432232314}',
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_runs_callback_arrives_signed_and_verifiable(app: App, receiver: Receiver) -> None:
    path = fresh_path()
    endpoint = register(app, receiver, path, description="orders")
    assert endpoint["id"].startswith("ep_")
    raw = base64.b64decode(endpoint["secret"].removeprefix("whsec_"))
    assert endpoint["secret"].startswith("whsec_") and 24 <= len(raw) <= 64
    assert endpoint["events"] == ["*"] and endpoint["enabled"] is True

    run = app.run("echo", {"order": 42})
    [call] = receiver.wait_calls(path, 1)
    assert call.verified_by == [endpoint["secret"]]
    assert call.headers["content-type"] == "application/json"
    assert "gateway" in call.headers["user-agent"]
    assert call.headers["webhook-id"].startswith("msg_")
    event = call.json()
    assert event["type"] == "run.completed"
    assert dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    with app.client() as client:
        assert event["data"] == client.get(f"/api/v1/runs/{run['id']}").json()
    # Our own helper for receivers agrees.
    assert verify(call.body, call.headers, endpoint["secret"])["data"]["id"] == run["id"]
    with pytest.raises(WebhookVerificationError):
        verify(call.body + b" ", call.headers, endpoint["secret"])

    def delivered() -> list[dict[str, Any]] | None:
        found = deliveries_of_run(app, run["id"])
        return found if found and found[0]["status"] == "delivered" else None

    [delivery] = wait_until(delivered, what="the delivery to be recorded")
    assert delivery["id"] == call.headers["webhook-id"]
    assert delivery["event_type"] == "run.completed"
    assert delivery["endpoint_id"] == endpoint["id"]
    [attempt] = delivery["attempts"]
    assert attempt["succeeded"] is True and attempt["status_code"] == 200
    assert attempt["response_body"] == "ok"
    assert attempt["latency_ms"] >= 0 and attempt["error"] is None


def test_event_and_task_filters(app: App, receiver: Receiver) -> None:
    failed_path, completed_path, started_path, sleep_path = (fresh_path() for _ in range(4))
    register(app, receiver, failed_path, events=["run.failed"])
    register(app, receiver, completed_path, events=["run.completed"])
    register(app, receiver, started_path, events=["run.started"])
    register(app, receiver, sleep_path, events=["*"], tasks=["sleep"])

    ok = app.run("echo", {"x": 1})
    bad = app.run("tests.fail", {"code": "nope"})
    slept = app.run("sleep", {"seconds": 0})

    completed = receiver.wait_calls(completed_path, 2)
    assert sorted(c.json()["data"]["id"] for c in completed) == sorted([ok["id"], slept["id"]])
    [failed] = receiver.wait_calls(failed_path, 1)
    assert failed.json()["type"] == "run.failed"
    assert failed.json()["data"]["error"]["code"] == "nope"
    started = receiver.wait_calls(started_path, 3)
    assert {c.json()["type"] for c in started} == {"run.started"}
    assert {c.json()["data"]["id"] for c in started} == {ok["id"], bad["id"], slept["id"]}
    assert all(c.json()["data"]["status"] == "EXECUTING" for c in started)
    [sleep_call] = receiver.wait_calls(sleep_path, 1)
    assert sleep_call.json()["data"]["id"] == slept["id"]

    # Nothing more comes to the filtered endpoints (the last run ended after the
    # calls above were made, and each delivery is recorded before it is sent).
    for path, count in ((failed_path, 1), (completed_path, 2), (sleep_path, 1)):
        assert len(receiver.calls_to(path)) == count


def test_500s_then_200_with_the_same_webhook_id_and_every_attempt_logged(
    app: App, receiver: Receiver
) -> None:
    path = fresh_path()
    endpoint = register(app, receiver, path)
    receiver.script(path, Answer(500, b"boom 1"), Answer(503, b"boom 2"), Answer(200, b"fine"))
    run = app.run("echo", {})
    calls = receiver.wait_calls(path, 3)
    assert len({c.headers["webhook-id"] for c in calls}) == 1
    assert all(c.verified_by for c in calls)

    delivery = wait_delivered(app, run["id"])
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 200]
    assert [a["response_body"] for a in delivery["attempts"]] == ["boom 1", "boom 2", "fine"]
    assert [a["succeeded"] for a in delivery["attempts"]] == [False, False, True]
    assert [a["number"] for a in delivery["attempts"]] == [1, 2, 3]
    assert endpoint_deliveries(app, endpoint["id"])[0]["id"] == delivery["id"]


def test_receiver_down_for_a_while_then_up_gets_the_message(app: App) -> None:
    down = Receiver()  # not started: connections are refused
    path = fresh_path()
    endpoint = register(app, down, path)
    run = app.run("echo", {"wait": "for me"})

    def failed_twice() -> bool:
        found = deliveries_of_run(app, run["id"])
        return bool(found) and len(found[0]["attempts"]) >= 2

    wait_until(failed_twice, what="two failed attempts")
    down.start()
    try:
        [call] = down.wait_calls(path, 1)
        assert call.verified_by == [endpoint["secret"]]
        assert call.json()["data"]["id"] == run["id"]
        [delivery] = wait_until(
            lambda: [d for d in deliveries_of_run(app, run["id"]) if d["status"] == "delivered"],
            what="the delivery to be marked delivered",
        )
    finally:
        down.stop()
    assert delivery["id"] == call.headers["webhook-id"]
    failures = delivery["attempts"][:-1]
    assert len(failures) >= 2
    assert all(a["status_code"] is None and "connection error" in a["error"] for a in failures)
    assert delivery["attempts"][-1]["status_code"] == 200


def test_410_gone_disables_the_endpoint_until_patched(app: App, receiver: Receiver) -> None:
    path = fresh_path()
    endpoint = register(app, receiver, path)
    receiver.script(path, Answer(410, b"gone"))
    app.run("echo", {})
    receiver.wait_calls(path, 1)
    with app.client() as client:
        disabled = wait_until(
            lambda: (
                (e := client.get(f"/api/v1/webhooks/{endpoint['id']}").json())["enabled"] is False
                and e
            ),
            what="the endpoint to be disabled",
        )
        assert "410" in disabled["disabled_reason"]
        assert disabled["disabled_at"] is not None

        app.run("echo", {"while": "disabled"})
        assert len(receiver.calls_to(path)) == 1  # a disabled endpoint gets nothing

        patched = client.patch(f"/api/v1/webhooks/{endpoint['id']}", json={"enabled": True})
        assert patched.status_code == 200
        assert patched.json()["enabled"] is True and patched.json()["disabled_reason"] is None
    again = app.run("echo", {"after": "patch"})
    calls = receiver.wait_calls(path, 2)
    assert calls[-1].json()["data"]["id"] == again["id"]


def test_rotation_signs_with_both_secrets_then_only_the_new_one(
    app: App, receiver: Receiver
) -> None:
    path = fresh_path()
    endpoint = register(app, receiver, path)
    old = endpoint["secret"]
    with app.client() as client:
        rotated = client.post(
            f"/api/v1/webhooks/{endpoint['id']}/rotate-secret", json={"grace_period": 1.5}
        ).json()
        new = rotated["secret"]
        assert new != old and new.startswith("whsec_")
        current = client.get(f"/api/v1/webhooks/{endpoint['id']}/secret").json()
        assert current["secret"] == new
        assert [p["secret"] for p in current["previous"]] == [old]
        receiver.verify_with(path, old, new)

        assert client.post(f"/api/v1/webhooks/{endpoint['id']}/test").status_code == 202
        [during] = receiver.wait_calls(path, 1)
        assert len(during.signatures) == 2
        assert sorted(during.verified_by) == sorted([old, new])
        assert during.json()["type"] == "webhook.test"

        expires = dt.datetime.fromisoformat(rotated["previous_expires_at"].replace("Z", "+00:00"))
        wait_until(
            lambda: dt.datetime.now(dt.UTC) > expires, timeout=10, what="the grace period to end"
        )
        client.post(f"/api/v1/webhooks/{endpoint['id']}/test")
        after = receiver.wait_calls(path, 2)[-1]
        assert len(after.signatures) == 1
        assert after.verified_by == [new]
        assert client.get(f"/api/v1/webhooks/{endpoint['id']}/secret").json()["previous"] == []


def test_resend_and_recover(app: App, receiver: Receiver) -> None:
    path = fresh_path()
    endpoint = register(app, receiver, path)
    receiver.default(path, 500)
    first = app.run("echo", {"n": 1})
    second = app.run("echo", {"n": 2})
    since = first["created_at"]

    def all_failed() -> bool:
        found = endpoint_deliveries(app, endpoint["id"])
        return len(found) == 2 and all(d["status"] == "failed" for d in found)

    # The compressed schedule has six attempts; each delivery uses them all.
    wait_until(all_failed, timeout=30, what="both deliveries to give up")
    assert all(len(d["attempts"]) == 6 for d in endpoint_deliveries(app, endpoint["id"]))
    receiver.default(path, 200)
    before = len(receiver.calls_to(path))

    [delivery_1] = deliveries_of_run(app, first["id"])
    with app.client() as client:
        resent = client.post(f"/api/v1/deliveries/{delivery_1['id']}/resend")
        assert resent.status_code == 202
        call = receiver.wait_calls(path, before + 1)[-1]
        assert call.headers["webhook-id"] == delivery_1["id"]
        wait_until(
            lambda: deliveries_of_run(app, first["id"])[0]["status"] == "delivered",
            what="the resent delivery to succeed",
        )
        last = deliveries_of_run(app, first["id"])[0]["attempts"][-1]
        assert last["trigger"] == "resend" and last["status_code"] == 200

        recovered = client.post(f"/api/v1/webhooks/{endpoint['id']}/recover", json={"since": since})
        assert recovered.status_code == 202
        [delivery_2] = deliveries_of_run(app, second["id"])
        assert recovered.json() == {
            "count": 1,
            "delivery_ids": [delivery_2["id"]],
            "failed": [delivery_2["id"]],
            "pending": [],
        }
    call = receiver.wait_calls(path, before + 2)[-1]
    assert call.headers["webhook-id"] == delivery_2["id"]
    wait_until(
        lambda: deliveries_of_run(app, second["id"])[0]["status"] == "delivered",
        what="the recovered delivery to succeed",
    )


def test_recover_sends_pending_deliveries_now_when_asked(app: App, receiver: Receiver) -> None:
    path = fresh_path()
    endpoint = register(app, receiver, path)
    # Down, and asking for an hour: the retries wait far in the future.
    receiver.default(path, Answer(503, headers={"retry-after": "3600"}))
    runs = [app.run("echo", {"n": n}) for n in range(3)]

    def waiting() -> list[dict[str, Any]]:
        found = endpoint_deliveries(app, endpoint["id"])
        ready = len(found) == 3 and all(
            d["status"] == "pending" and d["attempt_count"] == 1 and d["next_attempt_at"]
            for d in found
        )
        return found if ready else []

    pending = sorted(d["id"] for d in wait_until(waiting, what="three deliveries to wait"))
    receiver.default(path, 200)  # the receiver is fixed
    since = runs[0]["created_at"]
    with app.client() as client:
        url = f"/api/v1/webhooks/{endpoint['id']}/recover"
        failed_only = client.post(url, json={"since": since})
        assert failed_only.json() == {"count": 0, "delivery_ids": [], "failed": [], "pending": []}
        recovered = client.post(url, json={"since": since, "include_pending": True})
        assert recovered.status_code == 202, recovered.text
    assert recovered.json() == {
        "count": 3,
        "delivery_ids": pending,
        "failed": [],
        "pending": pending,
    }
    calls = receiver.wait_calls(path, 6)  # three 503s, then the three sent now
    assert sorted(c.headers["webhook-id"] for c in calls[3:]) == pending
    delivered = wait_until(
        lambda: all(d["status"] == "delivered" for d in endpoint_deliveries(app, endpoint["id"])),
        what="the pending deliveries to be delivered",
    )
    assert delivered
    for d in endpoint_deliveries(app, endpoint["id"]):
        assert [a["trigger"] for a in d["attempts"]] == ["schedule", "resend"]


def test_callback_url_of_one_run_is_signed_with_the_project_secret(
    app: App, receiver: Receiver
) -> None:
    path = fresh_path()
    with app.client() as client:
        secret = client.get("/api/v1/webhooks/signing-secret").json()["secret"]
        assert secret.startswith("whsec_")
        assert client.get("/api/v1/webhooks/signing-secret").json()["secret"] == secret
        receiver.verify_with(path, secret)
        accepted = client.post(
            "/api/v1/tasks/echo/trigger",
            json={"payload": {"one": "off"}, "options": {"callback_url": receiver.url(path)}},
        )
        assert accepted.status_code == 202
    [call] = receiver.wait_calls(path, 1)
    assert call.verified_by == [secret]
    assert call.json()["data"]["id"] == accepted.json()["id"]
    assert call.json()["data"]["output"] == {"one": "off"}


def test_private_addresses_are_refused_at_registration_and_at_send_time(
    app: App,
) -> None:
    refused = [
        "http://10.0.0.1/hook",
        "http://192.168.1.10/hook",
        "http://169.254.169.254/latest",
        "http://100.64.0.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://127.0.0.2:9/",
        # Other spellings of loopback, read as the resolver reads them.
        "http://2130706434/",
        "http://0x7f000002/",
        "http://0177.0.0.2/",
        "http://127.2/",
        "http://0/",
        "http://127.0.0.2./",
        "http://localhost./",
        "http://" + "".join(chr(ord(c) + 0xFEE0) for c in "localhost") + "/",
        "ftp://example.com/",
        "http://user:pw@example.com/",
    ]
    with app.client() as client:
        count = len(client.get("/api/v1/webhooks").json()["data"])
        for url in refused:
            answer = client.post("/api/v1/webhooks", json={"url": url})
            assert answer.status_code == 422, url
            assert answer.json()["error"]["code"] == "url_not_allowed", url
            trigger = client.post(
                "/api/v1/tasks/echo/trigger", json={"options": {"callback_url": url}}
            )
            assert trigger.status_code == 422, url
            assert trigger.json()["error"]["details"][0]["path"] == "options.callback_url"
        assert len(client.get("/api/v1/webhooks").json()["data"]) == count

    # At send time: a receiver on 127.0.0.2 (loopback, but outside the allowed
    # 127.0.0.1/32) behind an endpoint registered before the rule, as if the
    # rule had changed since. Nothing may reach it.
    trap = Receiver(host="127.0.0.2").start()
    endpoint_id = None
    try:
        path = fresh_path()
        endpoint_id = _insert_endpoint(app, trap.url(path))
        run = app.run("echo", {})

        def given_up() -> dict[str, Any] | None:
            found = deliveries_of_run(app, run["id"])
            return found[0] if found and found[0]["status"] == "failed" else None

        delivery = wait_until(given_up, timeout=30, what="the refused delivery to give up")
        assert delivery["endpoint_id"] == endpoint_id
        assert all(
            a["error"].startswith("refused: 127.0.0.2 is a loopback address")
            for a in delivery["attempts"]
        )
        assert trap.calls == []
    finally:
        trap.stop()
        if endpoint_id is not None:
            _delete_endpoint(app, endpoint_id)


def _insert_endpoint(app: App, url: str) -> str:
    """An endpoint row written straight to the database, past the API's checks."""
    import sqlalchemy as sa

    from db.ids import new_id
    from db.models import EndpointSecret, WebhookEndpoint
    from db.types import utcnow
    from webhooks.signing import generate_webhook_secret

    endpoint_id = new_id("ep")
    now = utcnow()

    def insert(conn: sa.Connection) -> None:
        conn.execute(
            WebhookEndpoint.__table__.insert(),
            {  # type: ignore[attr-defined]
                "id": endpoint_id,
                "project_id": app.project_id,
                "url": url,
                "description": "",
                "events": ["*"],
                "tasks": [],
                "enabled": True,
                "created_at": now,
                "updated_at": now,
            },
        )
        conn.execute(
            EndpointSecret.__table__.insert(),
            {  # type: ignore[attr-defined]
                "endpoint_id": endpoint_id,
                "secret": generate_webhook_secret(),
                "created_at": now,
            },
        )

    db_call(app.stack.database_url, insert, write=True)
    return endpoint_id


def _delete_endpoint(app: App, endpoint_id: str) -> None:
    with app.client() as client:
        assert client.delete(f"/api/v1/webhooks/{endpoint_id}").status_code == 204


def test_endpoint_crud_validation_and_isolation(app: App, receiver: Receiver) -> None:
    path = fresh_path()
    endpoint = register(app, receiver, path, events=["run.completed"], tasks=["echo"])
    endpoint_id = endpoint["id"]
    with app.client() as client:
        listed = client.get("/api/v1/webhooks").json()["data"]
        assert endpoint_id in [e["id"] for e in listed]
        assert all("secret" not in e for e in listed)
        got = client.get(f"/api/v1/webhooks/{endpoint_id}").json()
        assert got["events"] == ["run.completed"] and got["tasks"] == ["echo"]

        patched = client.patch(
            f"/api/v1/webhooks/{endpoint_id}",
            json={"events": ["run.failed", "run.completed"], "description": "both"},
        ).json()
        assert patched["events"] == ["run.failed", "run.completed"]
        assert patched["description"] == "both" and patched["tasks"] == ["echo"]

        bad = client.post(
            "/api/v1/webhooks",
            json={"url": receiver.url(path), "events": ["run.exploded"], "tasks": ["no-such-task"]},
        )
        assert bad.status_code == 422
        assert {d["path"] for d in bad.json()["error"]["details"]} == {"events.0", "tasks.0"}
        assert client.post("/api/v1/webhooks", json={"events": ["*"]}).status_code == 422
        assert (
            client.patch(f"/api/v1/webhooks/{endpoint_id}", json={"url": None}).status_code == 422
        )

        other = app.stack.new_key("webhook-stranger")
        with app.stack.client(other) as stranger:
            for method, suffix in (
                ("GET", ""),
                ("PATCH", ""),
                ("DELETE", ""),
                ("GET", "/secret"),
                ("POST", "/rotate-secret"),
                ("POST", "/test"),
                ("GET", "/deliveries"),
            ):
                answer = stranger.request(
                    method,
                    f"/api/v1/webhooks/{endpoint_id}{suffix}",
                    json={} if method != "GET" else None,
                )
                assert answer.status_code == 404, (method, suffix)
                assert answer.json()["error"]["code"] == "endpoint_not_found"
            assert stranger.get("/api/v1/webhooks").json()["data"] == []

        assert client.delete(f"/api/v1/webhooks/{endpoint_id}").status_code == 204
        assert client.get(f"/api/v1/webhooks/{endpoint_id}").status_code == 404
        assert endpoint_id not in [e["id"] for e in client.get("/api/v1/webhooks").json()["data"]]


def test_no_key_means_401_on_every_webhook_route(app: App) -> None:
    for method, url in (
        ("GET", "/api/v1/webhooks"),
        ("POST", "/api/v1/webhooks"),
        ("GET", "/api/v1/webhooks/signing-secret"),
        ("POST", "/api/v1/deliveries/msg_x/resend"),
        ("GET", "/api/v1/runs/run_x/deliveries"),
    ):
        answer = httpx.request(method, app.stack.base_url + url)
        assert answer.status_code == 401, url


def test_an_endpoint_failing_longer_than_the_span_is_disabled(app: App, receiver: Receiver) -> None:
    from tests.conftest import DISABLE_AFTER

    path = fresh_path()
    endpoint = register(app, receiver, path)
    receiver.default(path, 500)
    app.run("echo", {})
    receiver.wait_calls(path, 1)
    with app.client() as client:
        # The receiver answers before the worker's report of that attempt is applied.
        first = wait_until(
            lambda: (
                (e := client.get(f"/api/v1/webhooks/{endpoint['id']}").json())["failing_since"]
                and e
            ),
            what="the failed attempt to be recorded",
        )
        failing_since = dt.datetime.fromisoformat(first["failing_since"].replace("Z", "+00:00"))
        wait_until(
            lambda: dt.datetime.now(dt.UTC) > failing_since + dt.timedelta(seconds=DISABLE_AFTER),
            timeout=DISABLE_AFTER + 5,
            what="the failing span to pass",
        )
        app.run("echo", {"late": True})
        disabled = wait_until(
            lambda: (
                (e := client.get(f"/api/v1/webhooks/{endpoint['id']}").json())["enabled"] is False
                and e
            ),
            what="the endpoint to be disabled",
        )
    assert "failing without a success" in disabled["disabled_reason"]


def test_a_verified_call_with_a_stale_timestamp_is_refused_by_receivers() -> None:
    """Why each attempt is signed afresh: receivers refuse old timestamps."""
    from webhooks.signing import generate_webhook_secret, webhook_headers

    secret = generate_webhook_secret()
    body = '{"type":"run.completed"}'
    fresh = webhook_headers("msg_1", body, [secret])
    assert Webhook(secret).verify(body, fresh)
    stale = webhook_headers(
        "msg_1", body, [secret], timestamp=int(dt.datetime.now().timestamp()) - 3600
    )
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, stale)


def test_retry_after_is_honoured_within_bounds(app: App, receiver: Receiver) -> None:
    path = fresh_path()
    register(app, receiver, path)
    receiver.script(path, Answer(429, b"slow down", {"retry-after": "2"}), Answer(200))
    run = app.run("echo", {})
    receiver.wait_calls(path, 2)

    delivery = wait_delivered(app, run["id"])
    first, second = delivery["attempts"]
    assert first["status_code"] == 429
    gap = _at(second["at"]) - _at(first["at"])
    # The schedule's next delay is 0.3 s (±20 %); the receiver asked for 2 s.
    assert gap >= dt.timedelta(seconds=1.9), gap


def test_a_timeout_and_a_redirect_are_failures_and_redirects_are_not_followed(
    app: App, receiver: Receiver
) -> None:
    path, elsewhere = fresh_path(), fresh_path()
    register(app, receiver, path)
    receiver.script(
        path,
        Answer(200, delay=3.0),  # longer than the tests' WEBHOOK_TIMEOUT of 2 s
        Answer(302, b"moved", {"location": receiver.url(elsewhere)}),
        Answer(200),
    )
    run = app.run("echo", {})
    receiver.wait_calls(path, 3, timeout=30)

    delivery = wait_delivered(app, run["id"])
    timed_out, redirected, ok = delivery["attempts"]
    assert timed_out["status_code"] is None and "timed out after 2 s" in timed_out["error"]
    assert redirected["status_code"] == 302 and redirected["succeeded"] is False
    assert ok["status_code"] == 200
    assert receiver.calls_to(elsewhere) == []


def _at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
