"""The callback service's units of work (``webhooks.units``) on in-memory SQLite."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from db.ids import new_id
from db.models import Delivery, Project
from db.types import utcnow
from gateway.errors import NotFound
from gateway.runs.reports.one_by_one import apply_event
from tests.unit.conftest import PROJECT
from tests.unit.test_state_machine import create, event
from webhooks import units
from webhooks.signing import generate_webhook_secret

Unit = Callable[..., Any]
OTHER = "proj_other"
deliveries = Delivery.__table__  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def other_project(unit: Unit) -> None:
    unit(
        lambda conn: conn.execute(
            Project.__table__.insert(),  # type: ignore[attr-defined]
            {"id": OTHER, "name": "other", "created_at": utcnow()},
        )
    )


def new_endpoint(unit: Unit, project_id: str = PROJECT, events: tuple[str, ...] = ("*",)) -> str:
    now = utcnow()
    row = {
        "id": new_id("ep"),
        "project_id": project_id,
        "url": "https://receiver.example/hook",
        "description": "",
        "events": list(events),
        "tasks": [],
        "enabled": True,
        "disabled_reason": None,
        "disabled_at": None,
        "failing_since": None,
        "last_success_at": None,
        "created_at": now,
        "updated_at": now,
        "deleted_at": None,
    }
    unit(units.insert_endpoint, row, generate_webhook_secret())
    return str(row["id"])


def completed_run(unit: Unit) -> str:
    run_id = create(unit)
    unit(apply_event, event("started", run_id))
    unit(apply_event, event("completed", run_id, output={}))
    return run_id


def set_delivery(unit: Unit, delivery_id: str, **values: Any) -> None:
    unit(
        lambda conn: conn.execute(
            deliveries.update().where(deliveries.c.id == delivery_id).values(**values)
        )
    )


def delivery_ids(unit: Unit, endpoint_id: str) -> list[str]:
    page = unit(units.endpoint_deliveries, PROJECT, endpoint_id, 50, None)
    return [d["id"] for d in page["data"]]


def test_an_endpoint_is_its_projects_alone(unit: Unit) -> None:
    endpoint_id = new_endpoint(unit)
    assert [e["id"] for e in unit(units.list_endpoints, PROJECT)] == [endpoint_id]
    assert unit(units.list_endpoints, OTHER) == []
    for fn, args in (
        (units.read_secrets, ()),
        (units.update_endpoint, ({"description": "x"},)),
        (units.delete_endpoint, ()),
        (units.insert_test_delivery, ()),
    ):
        with pytest.raises(NotFound):
            unit(fn, OTHER, endpoint_id, *args)
    assert unit(units.read_secrets, PROJECT, endpoint_id)["secret"].startswith("whsec_")


def test_disabling_says_who_and_enabling_clears_the_failing_span(unit: Unit) -> None:
    endpoint_id = new_endpoint(unit)
    off = unit(units.update_endpoint, PROJECT, endpoint_id, {"enabled": False})
    assert off["enabled"] is False and off["disabled_reason"] == "disabled by the owner"
    unit(
        lambda conn: conn.execute(
            sa.text("UPDATE webhook_endpoints SET failing_since = :t WHERE id = :i"),
            {"t": utcnow(), "i": endpoint_id},
        )
    )
    on = unit(units.update_endpoint, PROJECT, endpoint_id, {"enabled": True})
    assert on["enabled"] is True
    assert on["disabled_reason"] is None and on["failing_since"] is None


def test_deleting_an_endpoint_fails_its_pending_deliveries_and_names_their_jobs(
    unit: Unit,
) -> None:
    endpoint_id = new_endpoint(unit)
    completed_run(unit)
    delivered_run = completed_run(unit)
    [pending, delivered] = sorted(delivery_ids(unit, endpoint_id))
    set_delivery(unit, delivered, status="delivered")
    queued = unit(units.delete_endpoint, PROJECT, endpoint_id)
    assert len(queued) == 1 and pending in queued[0]
    assert delivered_run  # its delivery stays delivered
    rows = {
        r["id"]: r
        for r in unit(
            lambda conn: [dict(x) for x in conn.execute(sa.select(deliveries)).mappings()]
        )
    }
    assert rows[pending]["status"] == "failed" and rows[pending]["last_error"] == "endpoint deleted"
    assert rows[delivered]["status"] == "delivered"
    assert unit(units.list_endpoints, PROJECT) == []
    with pytest.raises(NotFound):
        unit(units.read_secrets, PROJECT, endpoint_id)


def test_a_rotation_keeps_the_old_secret_for_the_grace_and_never_lengthens_an_end(
    unit: Unit,
) -> None:
    endpoint_id = new_endpoint(unit)
    first = unit(units.read_secrets, PROJECT, endpoint_id)["secret"]
    rotated = unit(units.rotate_secret, PROJECT, endpoint_id, "whsec_second", 3600)
    seen = unit(units.read_secrets, PROJECT, endpoint_id)
    assert seen["secret"] == "whsec_second" == rotated["secret"]
    assert [p["secret"] for p in seen["previous"]] == [first]
    # A second rotation with a longer grace does not keep the first one longer.
    unit(units.rotate_secret, PROJECT, endpoint_id, "whsec_third", 7200)
    ends = {
        p["secret"]: p["expires_at"]
        for p in unit(units.read_secrets, PROJECT, endpoint_id)["previous"]
    }
    assert ends[first] == rotated["previous_expires_at"]
    # No grace: only the newest signs.
    unit(units.rotate_secret, PROJECT, endpoint_id, "whsec_fourth", 0)
    now_signing = unit(units.read_secrets, PROJECT, endpoint_id)
    assert now_signing["secret"] == "whsec_fourth" and now_signing["previous"] == []


def test_a_resend_makes_a_message_pending_again_in_its_project_only(unit: Unit) -> None:
    endpoint_id = new_endpoint(unit)
    completed_run(unit)
    [delivery_id] = delivery_ids(unit, endpoint_id)
    set_delivery(unit, delivery_id, status="failed")
    with pytest.raises(NotFound):
        unit(units.reset_delivery, OTHER, delivery_id)
    view = unit(units.reset_delivery, PROJECT, delivery_id)
    assert view["id"] == delivery_id and view["status"] == "pending"


def test_recover_takes_failed_messages_since_a_time_and_pending_ones_when_asked(
    unit: Unit,
) -> None:
    endpoint_id = new_endpoint(unit)
    for _ in range(4):
        completed_run(unit)
    old_failed, failed, pending, delivered = sorted(delivery_ids(unit, endpoint_id))
    since = utcnow() - dt.timedelta(hours=1)
    set_delivery(unit, old_failed, status="failed", created_at=since - dt.timedelta(hours=1))
    set_delivery(unit, failed, status="failed")
    set_delivery(unit, delivered, status="delivered")
    found = unit(units.recover_deliveries, PROJECT, endpoint_id, since, False)
    assert found == {"failed": [failed]}
    set_delivery(unit, failed, status="failed")
    found = unit(units.recover_deliveries, PROJECT, endpoint_id, since, True)
    assert found == {"failed": [failed], "pending": [pending]}
    statuses = {
        d["id"]: d["status"]
        for d in unit(units.endpoint_deliveries, PROJECT, endpoint_id, 50, None)["data"]
    }
    assert statuses[failed] == "pending" and statuses[old_failed] == "failed"


def test_a_runs_deliveries_are_its_projects_alone(unit: Unit) -> None:
    new_endpoint(unit)
    run_id = completed_run(unit)
    page = unit(units.run_deliveries, PROJECT, run_id, 50, None)
    assert [d["run_id"] for d in page["data"]] == [run_id]
    with pytest.raises(NotFound) as missing:
        unit(units.run_deliveries, OTHER, run_id, 50, None)
    assert missing.value.code == "run_not_found"


def test_a_test_event_is_written_to_the_outbox_with_the_secrets_that_sign(unit: Unit) -> None:
    endpoint_id = new_endpoint(unit)
    secret = unit(units.read_secrets, PROJECT, endpoint_id)["secret"]
    view, outgoing = unit(units.insert_test_delivery, PROJECT, endpoint_id)
    assert view["event_type"] == "webhook.test" and view["status"] == "pending"
    assert outgoing.id == view["id"] and outgoing.secrets == (secret,)
    assert delivery_ids(unit, endpoint_id) == [view["id"]]


@pytest.mark.parametrize(
    ("marks", "lost"),
    [
        pytest.param("unmarked", False, id="handed over, never taken"),
        pytest.param("marked", True, id="taken without a claim, never recorded"),
        pytest.param("unknown", None, id="Redis does not answer"),
    ],
)
def test_a_scan_counts_a_first_attempt_lost_only_when_a_dispatcher_marked_it_taken(
    unit: Unit, marks: str, lost: bool | None
) -> None:
    """A first attempt whose lease (from its creation) ran out: sent as a
    first attempt when no dispatcher took it; recorded ``attempt_lost`` (the
    next attempt then follows the retry schedule) when one marked it taken
    (``webhooks.dispatch.taken_key``) and died; left for a later scan while
    the marks cannot be read."""
    from webhooks.deliveries import RetryPolicy
    from webhooks.dispatch import lease_due
    from webhooks.outbox import Outgoing

    endpoint_id = new_endpoint(unit)
    completed_run(unit)
    [delivery_id] = delivery_ids(unit, endpoint_id)
    long_ago = utcnow() - dt.timedelta(minutes=5)
    set_delivery(
        unit, delivery_id, created_at=long_ago, leased_at=long_ago, next_attempt_at=long_ago
    )
    taken = {"unmarked": set(), "marked": {delivery_id}, "unknown": None}[marks]
    policy = RetryPolicy(schedule=(1.0, 5.0), jitter=0.0, retry_after_max=60.0, disable_after=3600)
    leased = unit(lease_due, policy, 4.0, utcnow(), 10, taken)
    codes = unit(
        lambda conn: [
            row.error_code
            for row in conn.execute(
                sa.text("SELECT error_code FROM delivery_attempts WHERE delivery_id = :d"),
                {"d": delivery_id},
            )
        ]
    )
    if lost is None:
        assert (leased, codes) == ([], [])
        return
    [outcome] = leased
    if lost:  # recorded, and the next attempt waits its turn in the schedule
        assert isinstance(outcome, dict) and outcome["reason"] == "the last attempt was lost"
        assert codes == ["attempt_lost"]
    else:
        assert isinstance(outcome, Outgoing) and outcome.id == delivery_id
        assert codes == []
