"""Run control over real processes: idempotency, delay, TTL, retries, timeouts,
replay, listing, live events, public tokens, batches, rate limits and CORS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from tests.conftest import TEST_SECRET, Stack
from tests.helpers import dashboard_session, db_call, wait_until


def at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def final(client: httpx.Client, run_id: str, wait: float = 30) -> dict[str, Any]:
    run = client.get(f"/api/v1/runs/{run_id}", params={"wait": wait}).json()
    assert run["is_final"], run
    return dict(run)


def test_a_hundred_concurrent_triggers_with_one_key_make_one_run(stack: Stack) -> None:
    key = f"order-{time.time_ns()}"

    async def main() -> list[httpx.Response]:
        headers = {"authorization": f"Bearer {stack.api_key}", "idempotency-key": key}
        # The subject is one run out of a hundred, not how fast: a loaded
        # machine may take more than httpx's default 5 s to answer them all.
        async with httpx.AsyncClient(
            base_url=stack.base_url,
            headers=headers,
            limits=httpx.Limits(max_connections=50),
            timeout=60.0,
        ) as client:
            return await asyncio.gather(
                *(
                    client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": n}})
                    for n in range(100)
                )
            )

    answers = asyncio.run(main())
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert sorted(a.status_code for a in answers) == [200] * 99 + [202]
    assert sum(a.json()["is_cached"] for a in answers) == 99
    assert stack.query("SELECT COUNT(*) FROM runs WHERE idempotency_key = :k", k=key)[0][0] == 1
    with stack.client() as client:
        done = final(client, ids.pop())
        # The option works like the header; a completed run is still given back.
        again = client.post(
            "/api/v1/tasks/echo/trigger", json={"payload": {}, "options": {"idempotency_key": key}}
        )
        assert again.status_code == 200 and again.json()["id"] == done["id"]
        # Another task with the same key is another scope.
        other = client.post(
            "/api/v1/tasks/sleep/trigger",
            json={"payload": {"seconds": 0}, "options": {"idempotency_key": key}},
        )
        assert other.status_code == 202 and other.json()["id"] != done["id"]


def test_a_failed_run_frees_its_idempotency_key(stack: Stack) -> None:
    key = f"fail-{time.time_ns()}"
    with stack.client() as client:
        first = client.post(
            "/api/v1/tasks/tests.fail/trigger",
            json={"payload": {}, "options": {"idempotency_key": key}},
        ).json()
        assert final(client, first["id"])["status"] == "FAILED"
        second = client.post(
            "/api/v1/tasks/tests.fail/trigger",
            json={"payload": {}, "options": {"idempotency_key": key}},
        )
        assert second.status_code == 202
        assert second.json()["id"] != first["id"] and second.json()["is_cached"] is False
        # An expired key starts a new run too.
        short = f"short-{time.time_ns()}"
        one = client.post(
            "/api/v1/tasks/echo/trigger",
            json={"options": {"idempotency_key": short, "idempotency_key_ttl": 0.5}},
        ).json()
        wait_until(
            lambda: dt.datetime.now(dt.UTC) > at(one["created_at"]) + dt.timedelta(seconds=0.6),
            what="the key to expire",
        )
        two = client.post(
            "/api/v1/tasks/echo/trigger", json={"options": {"idempotency_key": short}}
        ).json()
        assert two["id"] != one["id"]


def test_a_delayed_run_does_not_start_early_and_can_be_rescheduled(stack: Stack) -> None:
    with stack.client() as client:
        delayed = client.post(
            "/api/v1/tasks/echo/trigger",
            json={"payload": {"late": 1}, "options": {"delay": "1.5s"}},
        )
        assert delayed.status_code == 202
        run = delayed.json()
        assert run["status"] == "DELAYED" and run["started_at"] is None
        done = final(client, run["id"])
        assert done["status"] == "COMPLETED"
        assert at(done["started_at"]) >= at(run["created_at"]) + dt.timedelta(seconds=1.5)

        far = client.post("/api/v1/tasks/echo/trigger", json={"options": {"delay": "1h"}}).json()
        assert client.get(f"/api/v1/runs/{far['id']}").json()["status"] == "DELAYED"
        moved = client.post(f"/api/v1/runs/{far['id']}/reschedule", json={"delay": 0.1})
        assert moved.status_code == 200 and moved.json()["status"] == "DELAYED"
        assert final(client, far["id"])["status"] == "COMPLETED"
        late = client.post(f"/api/v1/runs/{far['id']}/reschedule", json={"delay": 5})
        assert late.status_code == 409
        assert late.json()["error"]["code"] == "run_not_delayed"
        bad = client.post(f"/api/v1/runs/{far['id']}/reschedule", json={"delay": "soon"})
        assert bad.status_code == 422

        at_time = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).isoformat()
        timed = client.post("/api/v1/tasks/echo/trigger", json={"options": {"delay": at_time}})
        assert timed.json()["status"] == "DELAYED"
        assert final(client, timed.json()["id"])["status"] == "COMPLETED"


def test_a_run_not_started_within_its_ttl_expires_and_never_executes(
    single_slot_stack: Stack,
) -> None:
    stack = single_slot_stack
    with stack.client() as client:
        busy = client.post("/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 30}})
        wait_until(
            lambda: client.get(f"/api/v1/runs/{busy.json()['id']}").json()["status"] == "EXECUTING",
            what="the worker to be busy",
        )
        run = client.post(
            "/api/v1/tasks/echo/trigger", json={"payload": {}, "options": {"ttl": 1}}
        ).json()
        expired = final(client, run["id"])
        assert expired["status"] == "EXPIRED"
        assert expired["error"]["code"] == "expired"
        assert expired["attempts"] == [] and expired["started_at"] is None
        client.post(f"/api/v1/runs/{busy.json()['id']}/cancel")
        # The freed worker picks the expired run's job up and is told not to run it.
        after = client.post("/api/v1/tasks/echo/trigger", json={"payload": {}}).json()
        assert final(client, after["id"])["status"] == "COMPLETED"
        assert client.get(f"/api/v1/runs/{run['id']}").json()["attempts"] == []


def test_a_flaky_task_succeeds_on_attempt_three_with_each_attempt_listed(stack: Stack) -> None:
    with stack.client() as client:
        run = client.post(
            "/api/v1/tasks/tests.flaky/trigger",
            json={
                "payload": {"succeed_on": 3},
                "options": {"max_attempts": 3, "retry": {"min_delay": 0.1, "factor": 2}},
            },
        ).json()
        done = final(client, run["id"])
        assert done["status"] == "COMPLETED"
        assert done["output"] == {"attempt": 3}
        assert done["attempt"] == 3
        assert [a["status"] for a in done["attempts"]] == ["FAILED", "FAILED", "COMPLETED"]
        assert [a["error"]["code"] if a["error"] else None for a in done["attempts"]] == [
            "flaky",
            "flaky",
            None,
        ]
        transitions = [
            r[0]
            for r in stack.query(
                "SELECT to_status FROM run_transitions WHERE run_id = :id ORDER BY id", id=run["id"]
            )
        ]
        assert transitions.count("RETRYING") == 2
        # Out of attempts, the run fails with the last error.
        short = client.post(
            "/api/v1/tasks/tests.flaky/trigger",
            json={
                "payload": {"succeed_on": 5},
                "options": {"max_attempts": 2, "retry": {"min_delay": 0.05}},
            },
        ).json()
        failed = final(client, short["id"])
        assert failed["status"] == "FAILED" and len(failed["attempts"]) == 2
        # An error retrying cannot fix fails at once.
        once = client.post(
            "/api/v1/tasks/tests.fail/trigger", json={"payload": {}, "options": {"max_attempts": 5}}
        ).json()
        assert len(final(client, once["id"])["attempts"]) == 1


def test_max_duration_ends_the_run_timed_out_without_a_retry(stack: Stack) -> None:
    with stack.client() as client:
        run = client.post(
            "/api/v1/tasks/sleep/trigger",
            json={"payload": {"seconds": 10}, "options": {"max_duration": 0.5, "max_attempts": 3}},
        ).json()
        done = final(client, run["id"])
    assert done["status"] == "TIMED_OUT"
    assert done["error"]["code"] == "max_duration_exceeded"
    assert [a["status"] for a in done["attempts"]] == ["TIMED_OUT"]


def test_replay_makes_a_new_run_of_the_same_task_and_payload(stack: Stack) -> None:
    with stack.client() as client:
        original = stack.run("echo", {"again": True}, tags=["replayed"])
        replay = client.post(f"/api/v1/runs/{original['id']}/replay")
        assert replay.status_code == 202
        copy = final(client, replay.json()["id"])
    assert copy["id"] != original["id"]
    assert copy["output"] == {"again": True} and copy["tags"] == ["replayed"]
    assert copy["replayed_from"] == original["id"] and original["replayed_from"] is None
    assert (
        stack.query("SELECT replayed_from FROM runs WHERE id = :id", id=copy["id"])[0][0]
        == original["id"]
    )


def test_listing_pages_through_250_runs_while_more_arrive(stack: Stack) -> None:
    key = stack.new_key(f"listing-{time.time_ns()}")
    with stack.client(key) as client:
        items = [
            {
                "task": "echo",
                "payload": {"n": n},
                "options": {"tags": ["even" if n % 2 == 0 else "odd"]},
            }
            for n in range(250)
        ]
        batch = client.post("/api/v1/tasks/batch", json={"items": items})
        assert batch.status_code == 202
        created = [r["id"] for r in batch.json()["runs"]]
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 100}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/api/v1/runs", params=params).json()
            seen.extend(r["id"] for r in page["data"])
            # New runs arrive between pages; they are newer than the cursor.
            client.post("/api/v1/tasks/echo/trigger", json={"payload": {"late": True}})
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(created, reverse=True)
        assert len(set(seen)) == 250

        odd = client.get("/api/v1/runs", params={"tag": "odd", "limit": 100}).json()
        assert len(odd["data"]) == 100 and all("odd" in r["tags"] for r in odd["data"])
        wait_until(
            lambda: client.get(f"/api/v1/batches/{batch.json()['batch_id']}").json()["is_final"],
            timeout=60,
            what="the batch to finish",
        )
        summary = client.get(f"/api/v1/batches/{batch.json()['batch_id']}").json()
        assert summary["count"] == 250 and summary["counts"]["COMPLETED"] == 250
        completed = client.get(
            "/api/v1/runs", params={"status": "completed", "task": "echo", "limit": 5}
        ).json()
        assert [r["status"] for r in completed["data"]] == ["COMPLETED"] * 5
        newest = at(completed["data"][0]["created_at"])
        older = client.get(
            "/api/v1/runs", params={"created_before": newest.isoformat(), "limit": 1}
        ).json()["data"]
        assert older and at(older[0]["created_at"]) < newest
        assert client.get("/api/v1/runs", params={"status": "nope"}).status_code == 422
        assert client.get("/api/v1/runs", params={"limit": 101}).status_code == 422
        # Digits that are not ASCII ("³" passes str.isdigit, not int()) are refused too.
        for path in ("/api/v1/runs", "/api/v1/webhooks/ep_x/deliveries"):
            odd_limit = client.get(path, params={"limit": "³"})
            assert odd_limit.status_code == 422, odd_limit.text


def test_a_batch_with_a_bad_item_makes_nothing(stack: Stack) -> None:
    with stack.client() as client:
        before = stack.query("SELECT COUNT(*) FROM runs")[0][0]
        bad = client.post(
            "/api/v1/tasks/batch",
            json={
                "items": [
                    {"task": "echo", "payload": 1},
                    {"task": "sleep", "payload": {"seconds": -1}},
                    {"task": "nope"},
                ]
            },
        )
        assert bad.status_code == 422
        assert {d["path"] for d in bad.json()["error"]["details"]} == {
            "items.1.payload.seconds",
            "items.2.task",
        }
        assert stack.query("SELECT COUNT(*) FROM runs")[0][0] == before
        too_many = client.post("/api/v1/tasks/batch", json={"items": [{"task": "echo"}] * 501})
        assert too_many.status_code == 422


def test_an_sse_stream_follows_a_run_to_its_end(stack: Stack) -> None:
    with stack.client() as client:
        run = client.post("/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 0.5}}).json()
        events = []
        with client.stream("GET", f"/api/v1/runs/{run['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: ") :]))
    # Every status change, in order, from the first, and nothing after the end.
    assert [e["status"] for e in events] == ["QUEUED", "EXECUTING", "COMPLETED"]
    assert [e["transition"]["from"] for e in events] == [None, "QUEUED", "EXECUTING"]
    assert events[-1]["is_final"] is True
    assert events[-1]["output"] == {"slept": 0.5}
    # Replayed from the start after the end: the earlier statuses do not carry
    # the end's output.
    with stack.client() as client:
        replayed = [
            json.loads(line[len("data: ") :])
            for line in client.get(f"/api/v1/runs/{run['id']}/events").text.splitlines()
            if line.startswith("data: ")
        ]
    assert [e["status"] for e in replayed] == ["QUEUED", "EXECUTING", "COMPLETED"]
    assert [e["output"] for e in replayed] == [None, None, {"slept": 0.5}]
    assert replayed[0]["finished_at"] is None


def test_a_public_token_reads_one_run_only_until_it_expires(stack: Stack) -> None:
    with stack.client() as client:
        run = client.post("/api/v1/tasks/echo/trigger", json={"payload": {"p": 1}}).json()
        other = client.post("/api/v1/tasks/echo/trigger", json={"payload": {"p": 2}}).json()
    token = run["public_access_token"]
    assert token.startswith("pat_")
    bearer = {"authorization": f"Bearer {token}"}
    got = httpx.get(
        f"{stack.base_url}/api/v1/runs/{run['id']}", headers=bearer, params={"wait": 30}
    )
    assert got.status_code == 200 and got.json()["output"] == {"p": 1}
    by_query = httpx.get(f"{stack.base_url}/api/v1/runs/{run['id']}", params={"token": token})
    assert by_query.status_code == 200
    with httpx.stream(
        "GET", f"{stack.base_url}/api/v1/runs/{run['id']}/events", params={"token": token}
    ) as stream:
        assert stream.status_code == 200
    assert (
        httpx.get(f"{stack.base_url}/api/v1/runs/{other['id']}", headers=bearer).status_code == 404
    )
    assert (
        httpx.post(f"{stack.base_url}/api/v1/runs/{run['id']}/cancel", headers=bearer).status_code
        == 401
    )
    assert httpx.get(f"{stack.base_url}/api/v1/runs", headers=bearer).status_code == 401

    class Past(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 7200

    old = "pat_" + URLSafeTimedSerializer(
        TEST_SECRET, salt="gateway.public-run", signer=Past
    ).dumps({"run": run["id"]})
    expired = httpx.get(f"{stack.base_url}/api/v1/runs/{run['id']}", params={"token": old})
    assert expired.status_code == 401
    assert expired.json()["error"]["code"] == "token_expired"


def test_the_rate_limit_answers_429_with_its_headers(stack: Stack) -> None:
    from gateway.auth.keys import _create_api_key, generate_api_key
    from tests.helpers import db_call

    key = generate_api_key()
    db_call(
        stack.database_url,
        lambda conn: _create_api_key(conn, f"limited-{time.time_ns()}", key, 0.5, 2),
        write=True,
    )
    with stack.client(key) as client:
        answers = [client.get("/api/v1/runs", params={"limit": 1}) for _ in range(3)]
    assert [a.status_code for a in answers[:2]] == [200, 200]
    limited = answers[2]
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit"] == "2"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert int(limited.headers["x-ratelimit-reset"]) >= 1
    # Other keys are not limited by it.
    with stack.client() as client:
        assert client.get("/api/v1/runs", params={"limit": 1}).status_code == 200


def test_cors_lets_the_configured_origin_in(stack: Stack) -> None:
    preflight = httpx.options(
        f"{stack.base_url}/api/v1/runs/run_x",
        headers={
            "origin": "http://app.example",
            "access-control-request-method": "GET",
            "access-control-request-headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(
        f"{stack.base_url}/api/v1/runs/run_x",
        headers={"origin": "http://evil.example", "access-control-request-method": "GET"},
    )
    assert "access-control-allow-origin" not in other.headers


def _revoke(stack: Stack, key: str) -> None:
    from gateway.auth.keys import revoke_api_key

    db_call(stack.database_url, lambda conn: revoke_api_key(conn, key), write=True)


def _events_until_closed(lines: Iterator[str]) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a stream, until the server ends it."""
    events: list[tuple[str, dict[str, Any]]] = []
    kind = "message"
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: ") :])))
            kind = "message"
    return events


def test_a_revoked_key_ends_its_open_streams(stack: Stack) -> None:
    """An event stream and the dashboard's live feed opened with a key end
    within the key cache's lifetime once it is revoked, with an error event."""
    key = stack.new_key(f"revoked-streams-{secrets.token_hex(3)}")
    with stack.client(key) as client:
        run = client.post("/api/v1/tasks/sleep/trigger", json={"payload": {"seconds": 30}}).json()
        dash = dashboard_session(stack.base_url, key)
        try:
            with (
                client.stream("GET", f"/api/v1/runs/{run['id']}/events", timeout=20) as events,
                dash.stream("GET", "/dashboard/stream", timeout=20) as feed,
            ):
                assert events.status_code == 200 and feed.status_code == 200
                run_lines = events.iter_lines()
                while not next(run_lines).startswith("event: status"):
                    pass
                feed_lines = feed.iter_lines()
                assert next(feed_lines).startswith("retry:")
                _revoke(stack, key)
                # Both end by themselves (the run sleeps on for 30 s).
                run_events = _events_until_closed(run_lines)
                feed_events = _events_until_closed(feed_lines)
        finally:
            dash.close()
        assert run_events[-1][0] == "error", run_events
        assert run_events[-1][1]["error"]["code"] == "invalid_api_key"
        assert all(data.get("status") != "COMPLETED" for _, data in run_events)
        assert feed_events[-1][0] == "error", feed_events
        assert feed_events[-1][1]["error"]["code"] == "sign_in_required"
    with stack.client() as client:
        client.post(f"/api/v1/runs/{run['id']}/cancel")
