"""Units added for Trigger.dev's SDK, on in-memory SQLite: a schedule's
deduplication key, forgetting an idempotency key, listing waitpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from db.types import utcnow
from gateway.runs.create import reset_idempotency_key
from gateway.runs.requests import TriggerOptions
from gateway.schedules.schedules import create_schedule, list_schedules
from gateway.waitpoints.waitpoints import complete_waitpoint, create_waitpoint, list_waitpoints
from tests.unit.conftest import PROJECT
from tests.unit.test_state_machine import create

Unit = Callable[..., Any]


def test_a_deduplication_key_changes_the_schedule_that_has_it(unit: Unit) -> None:
    def make(cron: str, key: str | None, external_id: str) -> dict[str, Any]:
        result: dict[str, Any] = unit(
            lambda conn: create_schedule(
                conn,
                PROJECT,
                "echo",
                cron,
                "UTC",
                {},
                TriggerOptions(),
                True,
                utcnow(),
                external_id=external_id,
                deduplication_key=key,
            )
        )
        return result

    first = make("0 9 * * *", "daily", "u-1")
    again = make("0 10 * * *", "daily", "u-2")
    other = make("0 9 * * *", None, "u-3")
    assert again["id"] == first["id"] and again["cron"] == "0 10 * * *"
    assert again["external_id"] == "u-2" and again["deduplication_key"] == "daily"
    assert other["id"] != first["id"]
    assert sorted(s["id"] for s in unit(list_schedules, PROJECT)) == sorted(
        [first["id"], other["id"]]
    )


def test_a_forgotten_idempotency_key_lets_a_new_run_be_made(unit: Unit) -> None:
    from gateway.runs.create import NewRun, create_runs
    from tests.unit.test_state_machine import row

    def trigger() -> tuple[str, bool]:
        [(view, cached)] = unit(create_runs, [NewRun(row(idempotency_key="k-1"), 3600)]).runs
        return str(view["id"]), bool(cached)

    first, cached = trigger()
    again, cached_again = trigger()
    assert not cached and cached_again and again == first
    assert unit(reset_idempotency_key, PROJECT, "echo", "k-1") is True
    assert unit(reset_idempotency_key, PROJECT, "echo", "k-1") is False
    assert unit(reset_idempotency_key, PROJECT, "other-task", "k-1") is False
    fresh, cached_fresh = trigger()
    assert fresh != first and not cached_fresh
    assert create  # the state machine's helpers make these runs


def test_waitpoints_list_newest_first_by_status_in_pages(unit: Unit) -> None:
    made = [unit(create_waitpoint, PROJECT, None, None, [], utcnow())[0]["id"] for _ in range(5)]
    unit(complete_waitpoint, PROJECT, made[1], {"ok": True}, utcnow())
    # Newest first: IDs sort by creation time (within a millisecond, by ID).
    newest_first = sorted(made, reverse=True)
    first = unit(list_waitpoints, PROJECT, 2, None)
    assert [w["id"] for w in first["data"]] == newest_first[:2]
    second = unit(list_waitpoints, PROJECT, 2, first["next_cursor"])
    assert [w["id"] for w in second["data"]] == newest_first[2:4]
    last = unit(list_waitpoints, PROJECT, 2, second["next_cursor"])
    assert [w["id"] for w in last["data"]] == newest_first[4:] and last["next_cursor"] is None
    done = unit(list_waitpoints, PROJECT, 10, None, ("COMPLETED",))
    assert [w["id"] for w in done["data"]] == [made[1]]
    assert done["data"][0]["output"] == {"ok": True}
    assert unit(list_waitpoints, "proj_nobody", 10, None)["data"] == []


def test_tags_are_added_once_each_up_to_ten(unit: Unit) -> None:
    import pytest

    from gateway.errors import ValidationFailed
    from gateway.runs.control import add_tags
    from gateway.runs.errors import RunNotFound

    run_id = create(unit, tags=["a"])
    assert unit(add_tags, PROJECT, run_id, ["b", "a", "c"]) == ["a", "b", "c"]
    with pytest.raises(ValidationFailed):
        unit(add_tags, PROJECT, run_id, [f"t{n}" for n in range(8)])
    with pytest.raises(RunNotFound):
        unit(add_tags, "proj_other", run_id, ["x"])


def test_metadata_is_replaced_then_changed_by_each_operation_in_order(unit: Unit) -> None:
    import pytest

    from gateway.errors import ValidationFailed
    from gateway.runs.control import update_metadata

    run_id = create(unit, metadata={"kept": True, "gone": 1})
    after = unit(
        update_metadata,
        PROJECT,
        run_id,
        None,
        [
            {"type": "delete", "key": "gone"},
            {"type": "set", "key": "n", "value": 1},
            {"type": "increment", "key": "n", "value": 2},
            {"type": "append", "key": "log", "value": "a"},
            {"type": "append", "key": "log", "value": "b"},
            {"type": "remove", "key": "log", "value": "a"},
            {"type": "update", "value": {"merged": [1]}},
        ],
    )
    assert after == {"kept": True, "n": 3, "log": ["b"], "merged": [1]}
    assert unit(update_metadata, PROJECT, run_id, {"fresh": 1}, []) == {"fresh": 1}
    with pytest.raises(ValidationFailed) as bad:
        unit(
            update_metadata,
            PROJECT,
            run_id,
            None,
            [
                {"type": "set", "key": "s", "value": "x"},
                {"type": "increment", "key": "s", "value": 1},
            ],
        )
    assert bad.value.details[0]["path"] == "operations.1"
    assert unit(update_metadata, PROJECT, run_id, None, []) == {"fresh": 1}  # nothing half-done
