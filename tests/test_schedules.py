"""Schedules: one run per tick with two gateway processes, none after DELETE,
catch-up once, DST, and the inputs refused; on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from db.types import utcnow
from gateway.schedules.cron import CronError, check, next_tick, previous_tick
from tests.conftest import Stack
from tests.helpers import wait_until

UTC = dt.UTC


def test_a_five_second_schedule_makes_one_run_per_tick_and_none_after_delete(
    flow: Stack,
) -> None:
    with flow.client() as client:
        made = client.post(
            "/api/v1/schedules",
            json={
                "task": "echo",
                "cron": "*/5 * * * * *",
                "payload": {"from": "schedule"},
                "options": {"tags": ["scheduled"]},
            },
        )
        assert made.status_code == 201, made.text
        schedule = made.json()
        assert schedule["id"].startswith("sched_") and schedule["timezone"] == "UTC"
        first_tick = dt.datetime.fromisoformat(schedule["next_run_at"])
        assert first_tick.second % 5 == 0 and first_tick > utcnow() - dt.timedelta(seconds=1)

        def runs() -> list[Any]:
            return flow.query(
                "SELECT id, scheduled_at, status FROM runs WHERE schedule_id = :s "
                "ORDER BY scheduled_at",
                s=schedule["id"],
            )

        two = wait_until(lambda: len(runs()) >= 2 and runs(), timeout=20, what="two ticks")
        ticks = [
            dt.datetime.fromisoformat(str(r[1])).replace(tzinfo=UTC)
            if isinstance(r[1], str)
            else r[1]
            for r in two
        ]
        assert len(set(ticks)) == len(ticks)  # one run per tick
        assert all(t.second % 5 == 0 for t in ticks)
        run = client.get(f"/api/v1/runs/{two[0][0]}", params={"wait": 20}).json()
        assert run["status"] == "COMPLETED" and run["output"] == {"from": "schedule"}
        assert run["schedule_id"] == schedule["id"] and run["tags"] == ["scheduled"]
        assert run["scheduled_at"] is not None
        seen = client.get(f"/api/v1/schedules/{schedule['id']}").json()
        assert seen["last_run_id"] in {r[0] for r in runs()}
        assert schedule["id"] in {s["id"] for s in client.get("/api/v1/schedules").json()["data"]}

        deleted = client.delete(f"/api/v1/schedules/{schedule['id']}")
        assert deleted.status_code == 204
        after = len(runs())
        assert client.get(f"/api/v1/schedules/{schedule['id']}").status_code == 404
        # The next tick passes (a control schedule proves the scheduler went on).
        control = client.post(
            "/api/v1/schedules", json={"task": "echo", "cron": "*/2 * * * * *"}
        ).json()
        wait_until(
            lambda: (
                flow.query("SELECT COUNT(*) FROM runs WHERE schedule_id = :s", s=control["id"])[0][
                    0
                ]
                >= 3
            ),
            timeout=20,
            what="the control schedule's ticks",
        )
        client.delete(f"/api/v1/schedules/{control['id']}")
    assert len(runs()) == after


def test_a_disabled_schedule_makes_no_run_and_a_patch_moves_its_next_tick(
    flow: Stack,
) -> None:
    with flow.client() as client:
        made = client.post(
            "/api/v1/schedules",
            json={
                "task": "echo",
                "cron": "0 9 * * 1",
                "timezone": "Europe/Berlin",
                "enabled": False,
            },
        ).json()
        assert made["next_run_at"] is None and not made["enabled"]
        enabled = client.patch(f"/api/v1/schedules/{made['id']}", json={"enabled": True}).json()
        tick = dt.datetime.fromisoformat(enabled["next_run_at"])
        local = tick.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin"))
        assert (local.weekday(), local.hour, local.minute) == (0, 9, 0)
        moved = client.patch(
            f"/api/v1/schedules/{made['id']}", json={"cron": "30 18 * * *", "timezone": "UTC"}
        ).json()
        when = dt.datetime.fromisoformat(moved["next_run_at"])
        assert (when.hour, when.minute) == (18, 30)
        client.delete(f"/api/v1/schedules/{made['id']}")


def test_schedule_inputs_are_checked_and_change_nothing(flow: Stack) -> None:
    with flow.client() as client:
        before = client.get("/api/v1/schedules").json()["data"]
        for body, path in (
            ({"task": "echo", "cron": "every day"}, "cron"),
            ({"task": "echo", "cron": "* * *"}, "cron"),
            ({"task": "echo", "cron": "61 * * * *"}, "cron"),
            ({"task": "echo", "cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
            ({"task": "echo", "cron": "* * * * *", "options": {"delay": "5m"}}, "options.delay"),
            (
                {"task": "sleep", "cron": "* * * * *", "payload": {"seconds": "long"}},
                "payload.seconds",
            ),
        ):
            answer = client.post("/api/v1/schedules", json=body)
            assert answer.status_code == 422, (body, answer.text)
            assert path in [d["path"] for d in answer.json()["error"]["details"]], answer.text
        # Fields that each parse but never meet: February has no 31st.
        never = client.post("/api/v1/schedules", json={"task": "echo", "cron": "0 0 31 2 *"})
        assert never.status_code == 422, never.text
        assert never.json()["error"]["code"] == "invalid_cron"
        assert "never matches" in never.json()["error"]["details"][0]["message"]
        assert (
            client.post("/api/v1/schedules", json={"task": "nope", "cron": "* * * * *"}).status_code
            == 404
        )
        assert client.get("/api/v1/schedules").json()["data"] == before
        assert (
            client.patch("/api/v1/schedules/sched_nope", json={"enabled": False}).status_code == 404
        )
        assert client.delete("/api/v1/schedules/sched_nope").status_code == 404
        # Nor on a disabled schedule, nor on enabling one.
        off = client.post(
            "/api/v1/schedules", json={"task": "echo", "cron": "0 9 * * *", "enabled": False}
        ).json()
        for change in ({"cron": "0 0 30 2 *"}, {"cron": "0 0 31 2 *", "enabled": True}):
            patched = client.patch(f"/api/v1/schedules/{off['id']}", json=change)
            assert patched.status_code == 422, patched.text
            assert patched.json()["error"]["code"] == "invalid_cron"
        kept = client.get(f"/api/v1/schedules/{off['id']}").json()
        assert (kept["cron"], kept["enabled"]) == ("0 9 * * *", False)
        client.delete(f"/api/v1/schedules/{off['id']}")
        other = flow.new_key("sched-other")
        mine = client.post("/api/v1/schedules", json={"task": "echo", "cron": "0 0 1 1 *"}).json()
    with flow.client(other) as client:
        assert client.get(f"/api/v1/schedules/{mine['id']}").status_code == 404
        assert client.get("/api/v1/schedules").json()["data"] == []
    with flow.client() as client:
        client.delete(f"/api/v1/schedules/{mine['id']}")


@pytest.mark.parametrize(
    ("cron", "after", "expected"),
    [
        # Spring forward in Berlin: 02:30 does not exist on 29 March; it runs
        # once, at the jump (02:00 CET becomes 03:00 CEST = 01:00 UTC), then
        # at 02:30 again.
        (
            "30 2 * * *",
            "2026-03-28T12:00:00+00:00",
            ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"],
        ),
        # Every half hour: 02:00 and 02:30 are both skipped; one run at the
        # jump, then 03:30 CEST.
        (
            "*/30 * * * *",
            "2026-03-29T00:40:00+00:00",
            ["2026-03-29T01:00:00+00:00", "2026-03-29T01:30:00+00:00"],
        ),
        # Fall back: 02:30 comes twice on 25 October; it runs at the first.
        (
            "30 2 * * *",
            "2026-10-24T12:00:00+00:00",
            ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"],
        ),
        (
            "*/30 * * * *",
            "2026-10-25T00:00:00+00:00",
            ["2026-10-25T00:30:00+00:00", "2026-10-25T02:00:00+00:00"],
        ),
    ],
)
def test_dst_neither_skips_a_day_nor_runs_a_tick_twice(
    cron: str, after: str, expected: list[str]
) -> None:
    tick = dt.datetime.fromisoformat(after)
    got = []
    for _ in expected:
        tick = next_tick(cron, "Europe/Berlin", tick)
        got.append(tick.isoformat())
    assert got == expected


def test_cron_checks_and_previous_ticks() -> None:
    check("*/5 * * * * *")
    check("0 9 * * 1-5")
    for bad in ("", "* * * *", "* * * * * * *", "99 * * * *"):
        with pytest.raises(CronError):
            check(bad)
    at = dt.datetime(2026, 1, 1, 0, 0, 7, tzinfo=UTC)
    assert previous_tick("*/5 * * * * *", "UTC", at) == at.replace(second=5)
    assert previous_tick("*/5 * * * * *", "UTC", at.replace(second=10)) == at.replace(second=10)


def test_missed_ticks_make_one_run_on_catch_up(flow: Stack) -> None:
    """Ticks missed while nothing ran (set here by moving the next tick back
    an hour) make one run, for the latest of them."""
    with flow.client() as client:
        made = client.post(
            "/api/v1/schedules", json={"task": "echo", "cron": "* * * * *", "enabled": False}
        ).json()
    hour_ago = utcnow() - dt.timedelta(hours=1)
    from tests.helpers import db_call

    def rewind(conn: Any) -> None:
        import sqlalchemy as sa

        from gateway.schedules.schedules import schedules

        conn.execute(
            sa.update(schedules)
            .where(schedules.c.id == made["id"])
            .values(enabled=True, next_run_at=hour_ago.replace(second=0, microsecond=0))
        )

    db_call(flow.database_url, rewind, write=True)
    wait_until(
        lambda: flow.query("SELECT COUNT(*) FROM runs WHERE schedule_id = :s", s=made["id"])[0][0],
        timeout=20,
        what="the catch-up run",
    )
    with flow.client() as client:
        seen = client.get(f"/api/v1/schedules/{made['id']}").json()
        client.delete(f"/api/v1/schedules/{made['id']}")
    rows = flow.query("SELECT scheduled_at FROM runs WHERE schedule_id = :s", s=made["id"])
    assert len(rows) == 1  # sixty missed minutes, one run
    last = dt.datetime.fromisoformat(seen["last_run_at"])
    assert utcnow() - last < dt.timedelta(minutes=1, seconds=5)
    assert dt.datetime.fromisoformat(seen["next_run_at"]) > utcnow() - dt.timedelta(seconds=5)


def test_the_client_and_the_cli_cover_schedules_and_run_logs(flow: Stack) -> None:
    import json

    from gateway.client import Client, NotFoundError
    from tests.test_client import cli

    with Client(flow.base_url, flow.api_key) as gw:
        made = gw.create_schedule("echo", "0 12 * * *", timezone="Asia/Tokyo", payload={"a": 1})
        assert made["timezone"] == "Asia/Tokyo" and made["payload"] == {"a": 1}
        assert made["id"] in {s["id"] for s in gw.list_schedules()["data"]}
        assert not gw.update_schedule(made["id"], enabled=False)["enabled"]
        assert gw.get_schedule(made["id"])["next_run_at"] is None
        gw.delete_schedule(made["id"])
        with pytest.raises(NotFoundError):
            gw.get_schedule(made["id"])
        run = gw.trigger("tests.logs", {"lines": 2})
        gw.wait(run["id"])
        assert [line["level"] for line in gw.run_logs(run["id"])["data"]] == [
            "DEBUG",
            "INFO",
            "INFO",
            "WARNING",
        ]
    key = flow.api_key
    created = cli(
        flow, "schedules", "create", "echo", "0 0 1 1 *", "--payload", '{"b": 2}', key=key
    )
    assert created.returncode == 0, created.stderr
    schedule_id = json.loads(created.stdout)["id"]
    assert schedule_id in cli(flow, "schedules", "list", key=key).stdout
    assert (
        json.loads(cli(flow, "schedules", "disable", schedule_id, key=key).stdout)["enabled"]
        is False
    )
    bad = cli(flow, "schedules", "create", "echo", "whenever", key=key)
    assert bad.returncode == 1 and "cron" in bad.stderr
    assert (
        cli(flow, "schedules", "rm", schedule_id, key=key).stdout.strip()
        == f"deleted {schedule_id}"
    )
    logs = cli(flow, "runs", "logs", run["id"], key=key)
    assert logs.returncode == 0 and "line 1 of attempt 1" in logs.stdout
