"""Flow control as units of work on an in-memory SQLite: admission, the pump,
pausing, keys, priority, debounce and bulk pages, with no Redis and no processes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from db.types import utcnow
from gateway.queues.admission import flowing, pump_held
from gateway.queues.bulk import PAGE, bulk_page, create_bulk, load_bulk
from gateway.queues.queues import QueueExists, QueueNotFound, create_queue, get_queue, update_queue
from gateway.runs.create import Debounce, NewRun, create_runs
from gateway.runs.reports.one_by_one import apply_event
from gateway.runs.runs_table import runs, select_run
from gateway.runs.timers import release_due
from tests.unit.conftest import PROJECT
from tests.unit.test_state_machine import event, row, status

Unit = Callable[..., Any]


def flow(unit: Unit, fn: Callable[..., Any], *args: Any) -> tuple[Any, list[str]]:
    """Run ``fn`` as the service does (then its pumps); the result and the
    IDs of the runs the pumps handed out."""
    flowed = unit(flowing(fn), *args)
    return flowed.result, [job.run_id for job in flowed.jobs]


def trigger(unit: Unit, **values: Any) -> tuple[str, bool, list[str]]:
    """A new run: its ID, whether it starts at once, and what the pump handed out."""
    created, pumped = flow(unit, create_runs, [NewRun(row(**values))])
    [(view, _)] = created.runs
    starts = [job.run_id for job in created.effects.jobs]
    return str(view["id"]), view["id"] in starts or view["id"] in pumped, pumped


def start(unit: Unit, run_id: str) -> Any:
    return flow(unit, apply_event, event("started", run_id))


def complete(unit: Unit, run_id: str) -> list[str]:
    _, pumped = flow(unit, apply_event, event("completed", run_id, output=None))
    return pumped


def held(unit: Unit, run_id: str) -> bool:
    found = unit(select_run, run_id)
    assert found is not None
    return bool(found["held"])


def test_a_queue_without_a_limit_hands_every_run_out_at_once(unit: Unit) -> None:
    run_id, starts, pumped = trigger(unit)
    assert starts and not pumped and not held(unit, run_id)
    assert status(unit, run_id)["waiting_for"] == {"kind": "worker"}


def test_a_limit_holds_runs_in_the_database_and_a_slot_freed_hands_the_next(unit: Unit) -> None:
    unit(create_queue, PROJECT, "two", 2, False)
    ids = [trigger(unit, queue="two") for _ in range(4)]
    assert [starts for _, starts, _ in ids] == [True, True, False, False]
    first, second, third, fourth = (run_id for run_id, _, _ in ids)
    assert held(unit, third) and held(unit, fourth)
    assert status(unit, third)["waiting_for"] == {
        "kind": "queue_concurrency",
        "queue": "two",
        "running": 2,
        "limit": 2,
    }
    # A started report for a held run is refused: a stray job takes no slot.
    answer, _ = start(unit, third)
    assert not answer.proceed and held(unit, third)
    start(unit, first)
    assert complete(unit, first) == [third]  # in the same transaction
    assert not held(unit, third) and held(unit, fourth)
    assert complete(unit, second) == [fourth]


def test_a_paused_queue_starts_nothing_until_resumed_then_in_order(unit: Unit) -> None:
    unit(create_queue, PROJECT, "p", None, True)
    ids = [trigger(unit, queue="p")[0] for _ in range(3)]
    assert all(held(unit, i) for i in ids)
    assert status(unit, ids[0])["waiting_for"] == {"kind": "paused", "queue": "p"}
    assert unit(pump_held, utcnow()) == []
    view, pumped = flow(unit, update_queue, PROJECT, "p", {"paused": False})
    assert pumped == ids and not view["paused"]


def test_priority_is_a_head_start_and_old_runs_are_not_starved(unit: Unit) -> None:
    unit(create_queue, PROJECT, "one", 1, False)
    blocker = trigger(unit, queue="one")[0]
    now = utcnow()
    old = trigger(unit, queue="one", created_at=now - dt.timedelta(seconds=120), order_at=None)[0]
    plain = trigger(unit, queue="one")[0]
    urgent = trigger(unit, queue="one", priority=60)[0]
    start(unit, blocker)
    # 60 s of head start beats a run queued now, not one queued 2 minutes ago.
    assert complete(unit, blocker) == [old]
    start(unit, old)
    assert complete(unit, old) == [urgent]
    start(unit, urgent)
    assert complete(unit, urgent) == [plain]


def test_each_concurrency_key_has_the_limit_and_keys_take_turns(unit: Unit) -> None:
    unit(create_queue, PROJECT, "tenants", 1, True)
    a = [trigger(unit, queue="tenants", concurrency_key="a")[0] for _ in range(3)]
    b = [trigger(unit, queue="tenants", concurrency_key="b")[0] for _ in range(2)]
    c = trigger(unit, queue="tenants")[0]
    # Resumed: one of each key (and one of the keyless), oldest key first.
    _, pumped = flow(unit, update_queue, PROJECT, "tenants", {"paused": False})
    assert pumped == [a[0], b[0], c]
    assert status(unit, a[1])["waiting_for"] == {
        "kind": "concurrency_key",
        "queue": "tenants",
        "key": "a",
        "running": 1,
        "limit": 1,
    }
    _, pumped = flow(unit, update_queue, PROJECT, "tenants", {"concurrency_limit": 3})
    assert pumped == [a[1], b[1], a[2]]


def test_a_retry_waits_for_a_slot_again(unit: Unit) -> None:
    unit(create_queue, PROJECT, "r", 1, False)
    first = trigger(unit, queue="r", task="tests.flaky")[0]
    second = trigger(unit, queue="r")[0]
    start(unit, first)
    failed = event("failed", first, error={"code": "flaky", "message": "again", "retryable": True})
    _, pumped = flow(unit, apply_event, failed)
    assert pumped == [second]  # the retry's slot went to the next run
    later = utcnow() + dt.timedelta(hours=1)
    effects, _ = flow(unit, release_due, later)
    assert effects.jobs == [] and held(unit, first)


def test_a_task_that_declares_a_limit_gets_its_queue(unit: Unit) -> None:
    from jobs.tasks.registry import TaskDefinition, registry

    async def noop(payload: Any, ctx: Any) -> None:
        return None

    registry.register(
        TaskDefinition(name="units.limited", fn=noop, queue="units-lim", concurrency_limit=1)
    )
    first = trigger(unit, task="units.limited", queue="units-lim")
    second = trigger(unit, task="units.limited", queue="units-lim")
    assert first[1] and not second[1]
    assert unit(get_queue, PROJECT, "units-lim")["concurrency_limit"] == 1


def test_queues_are_made_once_and_an_unknown_one_is_not_found(unit: Unit) -> None:
    unit(create_queue, PROJECT, "made", 5, False)
    with pytest.raises(QueueExists):
        unit(create_queue, PROJECT, "made", 5, False)
    with pytest.raises(QueueNotFound):
        unit(get_queue, PROJECT, "nowhere")
    with pytest.raises(QueueNotFound):
        unit(update_queue, PROJECT, "nowhere", {"paused": True})
    # A queue a trigger names is made, with no limit.
    trigger(unit, queue="named-by-a-trigger")
    assert unit(get_queue, PROJECT, "named-by-a-trigger")["concurrency_limit"] is None


def test_debounce_pushes_one_delayed_run_back_up_to_its_max_delay(unit: Unit) -> None:
    now = utcnow()

    def debounced(payload: Any, at: dt.datetime, mode: str) -> tuple[str, bool]:
        new = row(
            status="DELAYED",
            payload=payload,
            created_at=at,
            updated_at=at,
            run_at=at + dt.timedelta(seconds=10),
            debounce_key=f"k-{mode}",
            debounce_until=now + dt.timedelta(seconds=25),
        )
        created, _ = flow(unit, create_runs, [NewRun(new, 0, Debounce(10, mode))])
        [(view, again)] = created.runs
        return str(view["id"]), again

    for mode, expected in (("leading", {"n": 0}), ("trailing", {"n": 2})):
        first, again = debounced({"n": 0}, now, mode)
        assert not again
        for n, at in ((1, 5), (2, 12)):
            same, again = debounced({"n": n}, now + dt.timedelta(seconds=at), mode)
            assert (same, again) == (first, True)
        run = unit(lambda conn, i=first: conn.execute(sa.select(runs).where(runs.c.id == i)).one())
        assert run.payload == expected
        # 12 s + 10 s would be 22 s; capped at 25 s it is, and a third push stops there.
        assert run.run_at == now + dt.timedelta(seconds=22)
        debounced({"n": 3}, now + dt.timedelta(seconds=20), mode)
        run = unit(lambda conn, i=first: conn.execute(sa.select(runs).where(runs.c.id == i)).one())
        assert run.run_at == now + dt.timedelta(seconds=25)
        assert status(unit, first)["waiting_for"]["kind"] == "debounce"


def test_bulk_cancel_goes_in_pages_and_a_page_done_twice_does_nothing_twice(
    unit: Unit,
) -> None:
    ids = [
        trigger(unit, status="DELAYED", run_at=utcnow() + dt.timedelta(hours=1), tags=["x"])[0]
        for _ in range(PAGE + 5)
    ]
    other = trigger(unit, status="DELAYED", run_at=utcnow() + dt.timedelta(hours=1))[0]
    bulk = unit(create_bulk, PROJECT, "cancel", {"filter": {"tag": "x"}}, utcnow())
    assert bulk["count"] == PAGE + 5
    first, _ = flow(unit, bulk_page, bulk["id"], utcnow())
    assert not first.done and len(first.effects.finished) == PAGE
    second, _ = flow(unit, bulk_page, bulk["id"], utcnow())
    assert second.done
    again, _ = flow(unit, bulk_page, bulk["id"], utcnow())
    assert again.done and not again.effects
    done = unit(load_bulk, PROJECT, bulk["id"])
    assert (done["processed"], done["succeeded"], done["skipped"]) == (PAGE + 5, PAGE + 5, 0)
    assert {status(unit, i)["status"] for i in ids} == {"CANCELED"}
    assert status(unit, other)["status"] == "DELAYED"
    repeat = unit(create_bulk, PROJECT, "cancel", {"ids": ids[:3]}, utcnow())
    flow(unit, bulk_page, repeat["id"], utcnow())
    assert unit(load_bulk, PROJECT, repeat["id"])["skipped"] == 3


def test_bulk_replay_makes_one_run_each_and_never_replays_its_own(unit: Unit) -> None:
    ids = [trigger(unit, tags=["r"])[0] for _ in range(3)]
    bulk = unit(create_bulk, PROJECT, "replay", {"filter": {"tag": "r"}}, utcnow())
    page, _ = flow(unit, bulk_page, bulk["id"], utcnow())
    assert page.done and len(page.effects.jobs) == 3
    replayed = unit(
        lambda conn: sorted(
            conn.execute(sa.select(runs.c.replayed_from).where(runs.c.replayed_from.is_not(None)))
            .scalars()
            .all()
        )
    )
    assert replayed == sorted(ids)


def test_a_bulk_actions_count_ends_as_the_runs_it_went_through(unit: Unit) -> None:
    """A run made before the action but committed after it (another
    transaction in flight) is selected too: the count says so once done."""
    made = utcnow()
    for _ in range(3):
        trigger(unit, tags=["late"])
    bulk = unit(create_bulk, PROJECT, "cancel", {"filter": {"tag": "late"}}, utcnow())
    assert bulk["count"] == 3
    trigger(unit, tags=["late"], created_at=made)  # committed now, made before
    page, _ = flow(unit, bulk_page, bulk["id"], utcnow())
    done = unit(load_bulk, PROJECT, bulk["id"])
    assert page.done and done["status"] == "completed"
    assert done["count"] == done["processed"] == 4
