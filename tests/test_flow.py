"""Flow control through real processes: queues with limits across two gateway
processes and three workers, concurrency keys, priority, debounce, pause and resume, bulk actions,
and a Redis flushed in the middle; on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import Stack
from tests.helpers import wait_until


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _trigger(client: httpx.Client, task: str, payload: Any = None, **options: Any) -> str:
    answer = client.post(
        f"/api/v1/tasks/{task}/trigger", json={"payload": payload, "options": options}
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def _all_final(stack: Stack, ids: list[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    def final() -> dict[str, dict[str, Any]] | None:
        rows = stack.query(
            "SELECT id, status, started_at FROM runs WHERE id IN :ids",
            ids=tuple(ids),
        )
        if all(r[1] == "COMPLETED" for r in rows) and len(rows) == len(ids):
            return {r[0]: {"status": r[1], "started_at": r[2]} for r in rows}
        return None

    return wait_until(final, timeout=timeout, interval=0.1, what=f"{len(ids)} runs to complete")


class Sampler:
    """Counts EXECUTING runs of a queue (per concurrency key) in the database,
    as often as it can, until stopped: the highest count seen."""

    def __init__(self, stack: Stack, queue: str) -> None:
        self.stack, self.queue = stack, queue
        self.most: dict[str | None, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self.stack.query(
                "SELECT concurrency_key, COUNT(*) FROM runs WHERE queue = :q "
                "AND status = 'EXECUTING' GROUP BY concurrency_key",
                q=self.queue,
            )
            for key, count in rows:
                self.most[key] = max(self.most.get(key, 0), int(count))
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_limit_of_two_holds_across_three_workers(flow: Stack) -> None:
    queue = _name("lim")
    with flow.client() as client:
        made = client.post("/api/v1/queues", json={"name": queue, "concurrency_limit": 2})
        assert made.status_code == 201, made.text
        assert made.json()["concurrency_limit"] == 2
        with Sampler(flow, queue) as sampler:
            ids = [_trigger(client, "sleep", {"seconds": 0.15}, queue=queue) for _ in range(30)]
            seen = client.get(f"/api/v1/queues/{queue}").json()
            assert seen["queued"] + seen["running"] <= 30 and seen["running"] <= 2
            _all_final(flow, ids)
    assert sampler.samples > 20
    assert max(sampler.most.values()) == 2, sampler.most
    workers = flow.query(
        "SELECT COUNT(DISTINCT worker_id) FROM run_attempts WHERE run_id IN :ids", ids=tuple(ids)
    )[0][0]
    assert workers >= 2  # the limit held across processes, not by one worker's slots


def _instant(value: dt.datetime | str) -> dt.datetime:
    """A time as the database gave it back (SQLite: text), in UTC."""
    moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def test_a_second_key_starts_before_the_first_keys_backlog_is_done(flow: Stack) -> None:
    queue = _name("keys")
    with flow.client() as client:
        client.post("/api/v1/queues", json={"name": queue, "concurrency_limit": 2})
        with Sampler(flow, queue) as sampler:
            a = [
                _trigger(client, "sleep", {"seconds": 0.2}, queue=queue, concurrency_key="a")
                for _ in range(20)
            ]
            b = [
                _trigger(client, "sleep", {"seconds": 0.2}, queue=queue, concurrency_key="b")
                for _ in range(2)
            ]
            b_triggered = dt.datetime.now(dt.UTC)
            done = _all_final(flow, a + b)
    a_started = sorted(_instant(done[i]["started_at"]) for i in a)
    b_started = [_instant(done[i]["started_at"]) for i in b]
    # Keys take turns: once b's runs wait, each slot that frees goes to b
    # before a's backlog goes on, so hardly any of a's start in between (how
    # much of a's backlog ran before b arrived depends on the machine's speed).
    overtaking = [s for s in a_started if b_triggered < s < max(b_started)]
    assert len(overtaking) <= 3, (b_triggered, b_started, a_started)
    assert max(b_started) < a_started[-1], (b_started, a_started)
    assert sampler.most.get("a", 0) <= 2 and sampler.most.get("b", 0) <= 2, sampler.most


def test_priority_runs_first_in_a_full_queue(flow: Stack) -> None:
    queue = _name("prio")
    with flow.client() as client:
        client.post("/api/v1/queues", json={"name": queue, "concurrency_limit": 1})
        blocker = _trigger(client, "sleep", {"seconds": 0.5}, queue=queue)
        plain = [_trigger(client, "echo", {"n": n}, queue=queue) for n in range(3)]
        urgent = _trigger(client, "echo", {"urgent": True}, queue=queue, priority=60)
        waiting = client.get(f"/api/v1/runs/{plain[0]}").json()
        assert waiting["waiting_for"] == {
            "kind": "queue_concurrency",
            "queue": queue,
            "running": 1,
            "limit": 1,
        }
        assert waiting["queue"] == queue and waiting["priority"] == 0
        done = _all_final(flow, [blocker, *plain, urgent])
    order = sorted(done, key=lambda i: done[i]["started_at"])
    assert order[:2] == [blocker, urgent] and order[2:] == plain


def test_priority_goes_ahead_on_arqs_queue_too(single_slot_stack: Stack) -> None:
    """Without a limit, a run's priority is its head start on arq's queue."""
    stack = single_slot_stack
    with stack.client() as client:
        blocker = _trigger(client, "sleep", {"seconds": 0.5})
        wait_until(
            lambda: (
                stack.query("SELECT status FROM runs WHERE id = :i", i=blocker)[0][0] == "EXECUTING"
            ),
            what="the blocker to start",
        )
        plain = [_trigger(client, "echo", {"n": n}) for n in range(3)]
        urgent = _trigger(client, "echo", {"urgent": True}, priority=60)
        done = _all_final(stack, [blocker, *plain, urgent])
    order = sorted(done, key=lambda i: done[i]["started_at"])
    assert order == [blocker, urgent, *plain]


def test_a_project_with_one_run_goes_next_whatever_another_queued(
    single_slot_stack: Stack,
) -> None:
    """Turns across projects on arq's queue: a second project's lone run gets
    the next free slot, not a place behind the first project's flood, and the
    flood keeps its own order."""
    stack = single_slot_stack
    flooder = stack.new_key(_name("flood"))
    lone = stack.new_key(_name("lone"))
    with stack.client(flooder) as client:
        payload = {"payload": {"seconds": 0.02}}
        answer = client.post(
            "/api/v1/tasks/batch",
            json={"items": [{"task": "sleep", **payload} for _ in range(150)]},
        )
        assert answer.status_code == 202, answer.text
        flood = [item["id"] for item in answer.json()["runs"]]

    def started() -> int:
        return int(
            stack.query(
                "SELECT count(*) FROM runs WHERE id IN :ids AND started_at IS NOT NULL",
                ids=tuple(flood),
            )[0][0]
        )

    wait_until(lambda: started() >= 10, what="the flood to be under way")
    with stack.client(lone) as client:
        mine = _trigger(client, "echo", {"lone": True})
    done = _all_final(stack, [*flood, mine], timeout=90)
    [(triggered,)] = stack.query("SELECT created_at FROM runs WHERE id = :i", i=mine)
    overtaking = [i for i in flood if triggered < done[i]["started_at"] < done[mine]["started_at"]]
    # The flood's runs that started between the lone trigger and its start: at
    # most the one that was running and one the worker had taken already.
    assert len(overtaking) <= 2, (len(overtaking), len(flood))
    flood_order = sorted(flood, key=lambda i: done[i]["started_at"])
    assert flood_order == flood


@pytest.mark.parametrize("mode", ["leading", "trailing"])
def test_debounce_gives_back_one_delayed_run(flow: Stack, mode: str) -> None:
    key = _name("deb")
    debounce = {"key": key, "delay": "0.6s", "mode": mode}
    with flow.client() as client:
        answers = [
            client.post(
                "/api/v1/tasks/echo/trigger",
                json={"payload": {"n": n}, "options": {"debounce": debounce}},
            )
            for n in range(3)
        ]
        first, *rest = (a.json() for a in answers)
        assert [a.status_code for a in answers] == [202, 200, 200]
        assert not first["debounced"] and all(r["debounced"] for r in rest)
        assert {r["id"] for r in rest} == {first["id"]}
        seen = client.get(f"/api/v1/runs/{first['id']}").json()
        assert seen["status"] == "DELAYED" and seen["waiting_for"]["kind"] == "debounce"
        assert seen["waiting_for"]["until"] >= rest[-1]["waiting_for"]["until"]
        final = client.get(f"/api/v1/runs/{first['id']}", params={"wait": 20}).json()
    assert final["status"] == "COMPLETED"
    assert final["output"] == ({"n": 0} if mode == "leading" else {"n": 2})
    count = flow.query("SELECT COUNT(*) FROM runs WHERE debounce_key = :k", k=key)[0][0]
    assert count == 1
    with flow.client() as client:  # once it started, the key makes a new run
        again = client.post(
            "/api/v1/tasks/echo/trigger",
            json={"payload": {"n": 9}, "options": {"debounce": debounce}},
        )
    assert again.status_code == 202 and again.json()["id"] != first["id"]


def test_a_paused_queue_holds_its_runs_until_resumed(flow: Stack) -> None:
    queue = _name("paused")
    with flow.client() as client:
        # A limit of one: the order in which resumed runs start is the order
        # in which the pump hands them out.
        made = client.post(
            "/api/v1/queues", json={"name": queue, "paused": True, "concurrency_limit": 1}
        )
        assert made.status_code == 201 and made.json()["paused"]
        ids = [_trigger(client, "echo", {"n": n}, queue=queue) for n in range(3)]
        seen = client.get(f"/api/v1/runs/{ids[0]}").json()
        assert seen["waiting_for"] == {"kind": "paused", "queue": queue}
        # The workers are up and the reconciler passes: an unlimited run completes.
        flow_run = client.get(
            f"/api/v1/runs/{_trigger(client, 'echo', {'control': True})}", params={"wait": 20}
        ).json()
        assert flow_run["status"] == "COMPLETED"
        statuses = flow.query("SELECT status, held FROM runs WHERE id IN :ids", ids=tuple(ids))
        assert [s for s, _ in statuses] == ["QUEUED"] * 3 and all(h for _, h in statuses)
        listed = {q["name"]: q for q in _every_queue(client)}
        assert listed[queue]["paused"] and listed[queue]["queued"] == 3
        resumed = client.patch(f"/api/v1/queues/{queue}", json={"paused": False})
        assert resumed.status_code == 200 and not resumed.json()["paused"]
        done = _all_final(flow, ids)
    assert sorted(done, key=lambda i: done[i]["started_at"]) == ids


def _every_queue(client: httpx.Client, limit: int = 100) -> list[dict[str, Any]]:
    """Every queue of the project, page after page."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/api/v1/queues", params=params).json()
        found += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


def test_queues_come_in_pages_and_a_queue_a_trigger_names_leaves_no_row(flow: Stack) -> None:
    key = flow.new_key(_name("named-queues"))
    prefix = _name("named")
    with flow.client(key) as client:
        answer = client.post(
            "/api/v1/tasks/batch",
            json={
                "items": [
                    {"task": "echo", "options": {"queue": f"{prefix}-{n:03}"}} for n in range(120)
                ]
            },
        )
        assert answer.status_code == 202, answer.text
        ids = [item["id"] for item in answer.json()["runs"]]
        _all_final(flow, ids)
        pages = _every_queue(client, limit=7)
        names = [q["name"] for q in pages]
        assert names == sorted(set(names))  # in order, none twice across pages
        assert not any(name.startswith(prefix) for name in names)
    rows = flow.query("SELECT count(*) FROM queues WHERE name LIKE :p", p=f"{prefix}%")[0][0]
    assert rows == 0


def _bulk_done(client: httpx.Client, bulk_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        view = client.get(f"/api/v1/bulk/{bulk_id}").json()
        return view if view["is_final"] else None

    return wait_until(done, what=f"bulk action {bulk_id}")


def test_bulk_cancel_by_filter_in_pages_and_bulk_replay_by_ids(flow: Stack) -> None:
    tag = _name("bulk")
    with flow.client() as client:
        items = [
            {"task": "echo", "payload": {"n": n}, "options": {"delay": "1h", "tags": [tag]}}
            for n in range(120)
        ]
        batch = client.post("/api/v1/tasks/batch", json={"items": items})
        assert batch.status_code == 202
        ids = [r["id"] for r in batch.json()["runs"]]
        spared = _trigger(client, "echo", None, delay="1h")
        before = flow.query("SELECT COUNT(*) FROM bulk_actions")[0][0]
        for bad in (
            {},
            {"filter": {}},
            {"filter": {"status": "NOPE"}},
            {"ids": []},
            {"filter": {"tag": tag}, "ids": ids[:1]},
        ):
            refused = client.post("/api/v1/runs/bulk/cancel", json=bad)
            assert refused.status_code == 422, (bad, refused.text)
            assert refused.json()["error"]["code"] == "validation_error"
        assert flow.query("SELECT COUNT(*) FROM bulk_actions")[0][0] == before
        made = client.post(
            "/api/v1/runs/bulk/cancel", json={"filter": {"tag": tag, "status": "DELAYED"}}
        )
        assert made.status_code == 202, made.text
        assert made.json()["count"] == 120 and made.headers["location"].endswith(
            made.json()["bulk_id"]
        )
        done = _bulk_done(client, made.json()["bulk_id"])
        assert (done["processed"], done["succeeded"], done["skipped"]) == (120, 120, 0)
        statuses = flow.query("SELECT DISTINCT status FROM runs WHERE id IN :ids", ids=tuple(ids))
        assert statuses == [("CANCELED",)]
        assert client.get(f"/api/v1/runs/{spared}").json()["status"] == "DELAYED"
        # Again: nothing left to cancel, every run counted as skipped.
        again = _bulk_done(
            client, client.post("/api/v1/runs/bulk/cancel", json={"ids": ids[:5]}).json()["bulk_id"]
        )
        assert (again["succeeded"], again["skipped"]) == (0, 5)
        replay = client.post("/api/v1/runs/bulk/replay", json={"ids": ids[:5]})
        assert replay.status_code == 202
        assert _bulk_done(client, replay.json()["bulk_id"])["succeeded"] == 5
        replays = [
            r[0]
            for r in flow.query(
                "SELECT id FROM runs WHERE replayed_from IN :ids", ids=tuple(ids[:5])
            )
        ]
        assert len(replays) == 5
        _all_final(flow, replays)
        client.post(f"/api/v1/runs/{spared}/cancel")


def test_a_limit_holds_through_a_redis_flushall(flow: Stack) -> None:
    queue = _name("flush")
    with flow.client() as client:
        client.post("/api/v1/queues", json={"name": queue, "concurrency_limit": 1})
        with Sampler(flow, queue) as sampler:
            ids = [_trigger(client, "sleep", {"seconds": 0.2}, queue=queue) for _ in range(6)]
            wait_until(
                lambda: (
                    flow.query(
                        "SELECT COUNT(*) FROM runs WHERE id IN :ids AND status = 'COMPLETED'",
                        ids=tuple(ids),
                    )[0][0]
                    >= 1
                ),
                what="a first run to complete",
            )
            # The stack's own Redis database (the others belong to other stacks).
            redis.Redis.from_url(flow.redis_url).flushdb()
            _all_final(flow, ids, timeout=90)
    assert sampler.most.get(None, 0) == 1, sampler.most


def test_flow_control_inputs_are_checked(flow: Stack) -> None:
    queue = _name("checked")
    with flow.client() as client:
        before = flow.query("SELECT COUNT(*) FROM runs")[0][0]
        for options in (
            {"queue": "no spaces"},
            {"queue": "x" * 101},
            {"priority": 86401},
            {"priority": -1},
            {"concurrency_key": ""},
            {"debounce": {"key": "k", "delay": 0}},
            {"debounce": {"key": "k", "delay": "1s", "mode": "sideways"}},
            {"debounce": {"key": "k", "delay": "1s"}, "delay": "5s"},
        ):
            answer = client.post(
                "/api/v1/tasks/echo/trigger", json={"payload": None, "options": options}
            )
            assert answer.status_code == 422, (options, answer.text)
        assert flow.query("SELECT COUNT(*) FROM runs")[0][0] == before
        assert (
            client.post("/api/v1/queues", json={"name": queue, "concurrency_limit": 0}).status_code
            == 422
        )
        assert client.post("/api/v1/queues", json={"name": queue}).status_code == 201
        conflict = client.post("/api/v1/queues", json={"name": queue})
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "queue_exists"
        assert (
            client.get("/api/v1/queues/nowhere-at-all").json()["error"]["code"] == "queue_not_found"
        )
        assert (
            client.patch("/api/v1/queues/nowhere-at-all", json={"paused": True}).status_code == 404
        )
        assert client.patch(f"/api/v1/queues/{queue}", json={"paused": "often"}).status_code == 422
        lifted = client.patch(f"/api/v1/queues/{queue}", json={"concurrency_limit": None})
        assert lifted.status_code == 200 and lifted.json()["concurrency_limit"] is None
        tasks = {t["name"]: t for t in client.get("/api/v1/tasks").json()["data"]}
        assert tasks["echo"]["queue"] == "echo"
        assert tasks["tests.limited"]["queue"] == "tests-limited"
        assert tasks["tests.limited"]["concurrency_limit"] == 1


def test_a_task_declared_limit_holds(flow: Stack) -> None:
    with flow.client() as client:
        with Sampler(flow, "tests-limited") as sampler:
            ids = [_trigger(client, "tests.limited", {"seconds": 0.1}) for _ in range(5)]
            _all_final(flow, ids)
        listed = {q["name"]: q for q in client.get("/api/v1/queues").json()["data"]}
    assert listed["tests-limited"]["concurrency_limit"] == 1
    assert sampler.most.get(None, 0) == 1, sampler.most


def test_the_client_and_the_cli_cover_queues_and_bulk_actions(flow: Stack) -> None:
    import json

    from gateway.client import AsyncClient, Client, ConflictError
    from tests.test_client import cli

    queue = _name("client")
    with Client(flow.base_url, flow.api_key) as gw:
        made = gw.create_queue(queue, concurrency_limit=1, paused=True)
        assert made["paused"] and made["concurrency_limit"] == 1
        with pytest.raises(ConflictError):
            gw.create_queue(queue)
        held = gw.trigger("echo", {"n": 1}, queue=queue, concurrency_key="c", priority=5)
        assert (held["queue"], held["concurrency_key"], held["priority"]) == (queue, "c", 5)
        assert gw.get_run(held["id"])["waiting_for"] == {"kind": "paused", "queue": queue}
        assert queue in {q["name"] for q in gw.list_queues()["data"]}
        assert [r["id"] for r in gw.list_runs(queue=queue)] == [held["id"]]
        bulk = gw.bulk_cancel(queue=queue, status=["QUEUED"])
        assert bulk["count"] == 1
        wait_until(lambda: gw.get_bulk(bulk["bulk_id"])["is_final"], what="the bulk cancel")
        assert gw.get_run(held["id"])["status"] == "CANCELED"
        assert not gw.resume_queue(queue)["paused"]
        with pytest.raises(TypeError):
            gw.bulk_replay(ids=[held["id"]], tag="x")

    async def from_async() -> None:
        async with AsyncClient(flow.base_url, flow.api_key) as gw:
            first = await gw.trigger("echo", 1, debounce={"key": queue, "delay": 0.5})
            again = await gw.trigger("echo", 2, debounce={"key": queue, "delay": 0.5})
            assert again["id"] == first["id"] and again["debounced"]
            assert (await gw.wait(first["id"]))["output"] == 1
            assert (await gw.update_queue(queue, concurrency_limit=None))[
                "concurrency_limit"
            ] is None

    import asyncio

    asyncio.run(from_async())

    key = flow.api_key
    listed = cli(flow, "queues", "list", key=key)
    assert listed.returncode == 0 and queue in listed.stdout, listed.stderr
    # One word, one meaning: a queue is active or paused; its runs executing.
    assert all(line.count("running") == 0 for line in listed.stdout.splitlines())
    assert "executing" in listed.stdout
    assert json.loads(cli(flow, "queues", "pause", queue, key=key).stdout)["paused"]
    limited = cli(flow, "queues", "limit", queue, "3", key=key)
    assert json.loads(limited.stdout)["concurrency_limit"] == 3
    bad = cli(flow, "queues", "limit", queue, "lots", key=key)
    assert bad.returncode == 2 and "a whole number or none" in bad.stderr
    triggered = cli(
        flow, "trigger", "echo", "--payload", "7", "--queue", queue, "--priority", "9", key=key
    )
    run = json.loads(triggered.stdout)
    assert run["queue"] == queue and run["priority"] == 9
    canceled = cli(flow, "runs", "bulk-cancel", "--id", run["id"], key=key)
    assert canceled.returncode == 0 and json.loads(canceled.stdout)["count"] == 1
    bulk_id = json.loads(canceled.stdout)["bulk_id"]
    wait_until(
        lambda: json.loads(cli(flow, "runs", "bulk", bulk_id, key=key).stdout)["is_final"],
        what="the CLI's bulk cancel",
    )
    refused = cli(flow, "runs", "bulk-replay", key=key)
    assert refused.returncode == 1 and "filter" in refused.stderr
    assert json.loads(cli(flow, "queues", "resume", queue, key=key).stdout)["paused"] is False
