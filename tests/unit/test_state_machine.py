"""The run state machine as units of work on an in-memory SQLite: no Redis, no processes.

Each test runs the units (``gateway.runs``) the way the database runs them, one
transaction each, and checks the run's row, its transition log and the
``Effects`` the unit hands back: every transition, every lost race, every effect.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from db.ids import new_id
from db.models import RunStatus, WebhookEndpoint
from db.types import utcnow
from gateway.errors import InvalidEvent
from gateway.runs.control import cancel_run
from gateway.runs.create import NewRun, create_runs
from gateway.runs.errors import LostRace, RunAlreadyFinal, RunNotDelayed, RunNotFound
from gateway.runs.read import load_run
from gateway.runs.recovery import LOST_CODE, recover_lost
from gateway.runs.reports.one_by_one import apply_event
from gateway.runs.runs_table import KeepFirst, runs, select_run, transition
from gateway.runs.timers import release_due, reschedule
from jobs.protocol import TIMED_OUT_CODE, WORKFLOW_TASK, WorkerEvent, run_job_id
from tests.unit.conftest import PROJECT

T = TypeVar("T")


def row(task: str = "echo", **values: Any) -> dict[str, Any]:
    now = utcnow()
    return {
        "id": new_id("run"),
        "project_id": PROJECT,
        "task": task,
        "status": RunStatus.QUEUED.value,
        "attempt": 1,
        "payload": {"n": 1},
        "output": None,
        "error_code": None,
        "error_message": None,
        "tags": [],
        "metadata": {},
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
        "callback_url": None,
        "step": 0,
        "step_pending": False,
        "parent_id": None,
        "node_id": None,
        "run_at": None,
        "expire_at": None,
        "max_attempts": 3,
        "retry": {"factor": 2.0, "min_delay": 1.0, "max_delay": 60.0, "jitter": 0.0},
        "max_duration": None,
        "idempotency_key": None,
        "replayed_from": None,
        "batch_id": None,
        **values,
    }


def create(unit: Callable[..., Any], **values: Any) -> str:
    new = row(**values)
    [(view, cached)] = unit(create_runs, [NewRun(new, 3600)]).runs
    assert not cached
    return str(view["id"])


def event(kind: str, run_id: str, attempt: int = 1, **fields: Any) -> WorkerEvent:
    return WorkerEvent.model_validate(
        {"type": kind, "run_id": run_id, "attempt": attempt, "worker_id": "unit", **fields}
    )


def status(unit: Callable[..., Any], run_id: str) -> dict[str, Any]:
    found = unit(load_run, None, run_id)
    assert found is not None
    return dict(found)


def history(engine: sa.Engine, run_id: str) -> list[tuple[str | None, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT from_status, to_status FROM run_transitions WHERE run_id = :r ORDER BY id"
            ),
            {"r": run_id},
        )
        return [(r[0], r[1]) for r in rows]


def endpoint(unit: Callable[..., Any], events: list[str]) -> str:
    endpoint_id = new_id("ep")
    now = utcnow()
    unit(
        lambda conn: conn.execute(
            WebhookEndpoint.__table__.insert(),  # type: ignore[attr-defined]
            {
                "id": endpoint_id,
                "project_id": PROJECT,
                "url": "https://receiver.example/hook",
                "description": "",
                "events": events,
                "tasks": [],
                "enabled": True,
                "created_at": now,
                "updated_at": now,
            },
        )
    )
    return endpoint_id


# -- a run's life -------------------------------------------------------------------


def test_queued_executing_completed_with_its_effects(
    engine: sa.Engine, unit: Callable[..., Any]
) -> None:
    endpoint(unit, ["run.started", "run.completed"])
    run_id = create(unit)
    started = unit(apply_event, event("started", run_id))
    assert (started.applied, started.status, started.proceed) == (True, "EXECUTING", True)
    assert started.effects.changed == [run_id] and started.effects.finished == []
    assert [o.url for o in started.effects.outgoing] == ["https://receiver.example/hook"]
    done = unit(apply_event, event("completed", run_id, output={"ok": True}))
    assert (done.applied, done.status) == (True, "COMPLETED")
    assert done.effects.changed == [run_id] and len(done.effects.outgoing) == 1
    assert done.effects.finished == [run_id]  # a long-poll reads the run again only now
    assert done.effects.jobs == [] and done.effects.abort == []
    view = status(unit, run_id)
    assert view["status"] == "COMPLETED" and view["output"] == {"ok": True}
    assert view["started_at"] is not None and view["finished_at"] is not None
    assert [a["status"] for a in view["attempts"]] == ["COMPLETED"]
    assert history(engine, run_id) == [
        (None, "QUEUED"),
        ("QUEUED", "EXECUTING"),
        ("EXECUTING", "COMPLETED"),
    ]


def test_repeated_late_and_stale_reports_change_nothing(
    engine: sa.Engine, unit: Callable[..., Any]
) -> None:
    run_id = create(unit)
    unit(apply_event, event("started", run_id))
    again = unit(apply_event, event("started", run_id))
    # The same attempt re-delivered may go on (at-least-once); nothing is applied.
    assert (again.applied, again.status, again.proceed) == (False, "EXECUTING", True)
    stale = unit(apply_event, event("started", run_id, attempt=2))
    assert (stale.applied, stale.proceed) == (False, False)
    unit(apply_event, event("completed", run_id, output=1))
    late = unit(apply_event, event("failed", run_id, error={"code": "x", "message": "late"}))
    assert (late.applied, late.status) == (False, "COMPLETED") and not late.effects
    assert len(history(engine, run_id)) == 3


def test_a_completed_report_before_started_still_ends_the_run(unit: Callable[..., Any]) -> None:
    run_id = create(unit)
    done = unit(apply_event, event("completed", run_id, output=[1]))
    assert done.applied and done.status == "COMPLETED"
    view = status(unit, run_id)
    assert view["started_at"] is not None
    assert [a["status"] for a in view["attempts"]] == ["COMPLETED"]


def test_a_retryable_failure_retries_with_backoff_then_fails(unit: Callable[..., Any]) -> None:
    run_id = create(unit, max_attempts=2)
    unit(apply_event, event("started", run_id))
    error = {"code": "flaky", "message": "try again", "retryable": True}
    first = unit(apply_event, event("failed", run_id, error=error))
    assert (first.status, first.effects.jobs) == ("RETRYING", [])
    assert first.effects.finished == []
    run = unit(select_run, run_id)
    assert run["attempt"] == 2
    with_time = unit(lambda conn: conn.scalar(sa.select(runs.c.run_at).where(runs.c.id == run_id)))
    assert with_time > utcnow()  # min_delay 1 s, no jitter
    # Not due yet: the scheduler leaves it; once due, it is queued as attempt 2.
    assert unit(release_due, utcnow()).jobs == []
    due = unit(release_due, utcnow() + dt.timedelta(seconds=5))
    assert [(j.run_id, j.attempt) for j in due.jobs] == [(run_id, 2)]
    unit(apply_event, event("started", run_id, attempt=2))
    last = unit(apply_event, event("failed", run_id, attempt=2, error=error))
    assert last.status == "FAILED"
    view = status(unit, run_id)
    assert [a["status"] for a in view["attempts"]] == ["FAILED", "FAILED"]
    assert view["error"] == {"code": "flaky", "message": "try again"}


@pytest.mark.parametrize(
    ("error", "final"),
    [
        ({"code": "bad", "message": "no", "retryable": False}, "FAILED"),
        ({"code": TIMED_OUT_CODE, "message": "too long", "retryable": True}, "TIMED_OUT"),
    ],
)
def test_a_failure_that_is_not_retried_ends_the_run(
    unit: Callable[..., Any], error: dict[str, Any], final: str
) -> None:
    run_id = create(unit)
    unit(apply_event, event("started", run_id))
    assert unit(apply_event, event("failed", run_id, error=error)).status == final


def test_heartbeats_keep_an_attempt_alive_and_tell_a_finished_one_to_stop(
    unit: Callable[..., Any],
) -> None:
    run_id = create(unit)
    unit(apply_event, event("started", run_id))
    beat = unit(apply_event, event("heartbeat", run_id))
    assert (beat.applied, beat.proceed) == (False, True)
    unit(apply_event, event("completed", run_id))
    assert unit(apply_event, event("heartbeat", run_id)).proceed is False


def test_an_unknown_run_is_run_not_found(unit: Callable[..., Any]) -> None:
    with pytest.raises(RunNotFound):
        unit(apply_event, event("started", "run_nope"))


# -- time ---------------------------------------------------------------------------


def test_a_delayed_run_starts_when_due_and_can_be_rescheduled(unit: Callable[..., Any]) -> None:
    later = utcnow() + dt.timedelta(hours=1)
    run_id = create(unit, status=RunStatus.DELAYED.value, run_at=later)
    assert unit(release_due, utcnow()).jobs == []
    unit(reschedule, PROJECT, run_id, utcnow() - dt.timedelta(seconds=1))
    due = unit(release_due, utcnow())
    assert [j.run_id for j in due.jobs] == [run_id] and due.changed == [run_id]
    assert unit(select_run, run_id)["status"] == "QUEUED"
    with pytest.raises(RunNotDelayed):
        unit(reschedule, PROJECT, run_id, later)
    with pytest.raises(RunNotFound):
        unit(reschedule, "proj_other", run_id, later)


def test_a_run_past_its_ttl_expires_and_never_executes(unit: Callable[..., Any]) -> None:
    past = utcnow() - dt.timedelta(seconds=1)
    waiting = create(unit, expire_at=past)
    started = unit(apply_event, event("started", waiting))
    assert (started.status, started.proceed) == ("EXPIRED", False)
    queued = create(unit, expire_at=past)
    due = unit(release_due, utcnow())
    assert due.abort == [run_job_id(queued)] and due.changed == [queued]
    assert due.finished == [queued]
    assert unit(select_run, queued)["status"] == "EXPIRED"


# -- cancel ------------------------------------------------------------------------


def test_cancel_aborts_the_job_and_refuses_a_final_run(unit: Callable[..., Any]) -> None:
    run_id = create(unit)
    unit(apply_event, event("started", run_id))
    done = unit(cancel_run, PROJECT, run_id)
    assert done.abort == [run_job_id(run_id)] and done.changed == [run_id]
    assert done.finished == [run_id]
    view = status(unit, run_id)
    assert view["status"] == "CANCELED" and view["attempts"][0]["status"] == "CANCELED"
    with pytest.raises(RunAlreadyFinal):
        unit(cancel_run, PROJECT, run_id)
    with pytest.raises(RunNotFound):
        unit(cancel_run, "proj_other", create(unit))


# -- workflows --------------------------------------------------------------------------


def workflow_step(unit: Callable[..., Any], run_id: str, step: int, **fields: Any) -> Any:
    unit(apply_event, event("started", run_id, step=step))
    return unit(apply_event, event("waiting", run_id, step=step, **fields))


def test_a_workflow_waits_for_its_children_without_a_slot(unit: Callable[..., Any]) -> None:
    parent = create(unit, task=WORKFLOW_TASK, payload={"nodes": [{"id": "a"}, {"id": "b"}]})
    spawn = [{"node_id": n, "task": "echo", "payload": {"n": n}} for n in ("a", "b")]
    waiting = workflow_step(unit, parent, 0, spawn=spawn)
    assert (waiting.applied, waiting.status) == (True, "WAITING")
    children = [j.run_id for j in waiting.effects.jobs]
    assert len(children) == 2
    first, second = children
    unit(apply_event, event("started", first))
    moved = unit(apply_event, event("completed", first, output="A"))
    # The first child's end queues the workflow's next step (a short job).
    [step] = moved.effects.jobs
    assert (step.run_id, step.step) == (parent, 1)
    assert step.state is not None and step.state["a"]["output"] == "A"
    assert set(moved.effects.changed) == {first, parent}
    assert moved.effects.finished == [first]  # the workflow itself goes on
    # The second ends while step 1 is in flight: one more step after it.
    unit(apply_event, event("started", second))
    during = unit(apply_event, event("completed", second, output="B"))
    assert during.effects.jobs == []
    again = workflow_step(unit, parent, 1)
    assert again.status == "QUEUED"
    [next_step] = again.effects.jobs
    assert next_step.step == 2
    assert next_step.state is not None and next_step.state["b"]["output"] == "B"


def test_canceling_a_workflow_cancels_its_children(unit: Callable[..., Any]) -> None:
    parent = create(unit, task=WORKFLOW_TASK, payload={"nodes": [{"id": "a"}]})
    waiting = workflow_step(unit, parent, 0, spawn=[{"node_id": "a", "task": "echo"}])
    [child] = [j.run_id for j in waiting.effects.jobs]
    done = unit(cancel_run, PROJECT, parent)
    assert set(done.changed) >= {parent, child}
    assert unit(select_run, child)["status"] == "CANCELED"


def test_only_a_workflow_waits(unit: Callable[..., Any]) -> None:
    run_id = create(unit)
    unit(apply_event, event("started", run_id))
    with pytest.raises(InvalidEvent):
        unit(apply_event, event("waiting", run_id, spawn=[]))
    assert unit(select_run, run_id)["status"] == "EXECUTING"


# -- recovery and races --------------------------------------------------------------


def test_a_silent_attempt_is_lost_and_retried_then_fails(unit: Callable[..., Any]) -> None:
    run_id = create(unit, max_attempts=2)
    unit(apply_event, event("started", run_id))
    later = utcnow() + dt.timedelta(seconds=120)
    lost = unit(recover_lost, later, 60.0)
    assert lost.abort == [run_job_id(run_id)]
    assert unit(select_run, run_id)["status"] == "RETRYING"
    unit(release_due, later + dt.timedelta(seconds=60))
    unit(apply_event, event("started", run_id, attempt=2))
    assert unit(recover_lost, utcnow(), 60.0).abort == []  # it just spoke: not silent
    unit(recover_lost, later + dt.timedelta(seconds=600), 60.0)
    view = status(unit, run_id)
    assert view["status"] == "FAILED" and view["error"]["code"] == LOST_CODE


def test_a_transition_that_lost_the_race_raises_and_changes_nothing(
    engine: sa.Engine, unit: Callable[..., Any]
) -> None:
    run_id = create(unit)
    seen = unit(select_run, run_id)  # what one process read...
    unit(apply_event, event("started", run_id))  # ...before another moved the run
    with pytest.raises(LostRace):
        unit(transition, seen, RunStatus.CANCELED, utcnow(), {"finished_at": utcnow()})
    assert unit(select_run, run_id)["status"] == "EXECUTING"
    assert history(engine, run_id)[-1] == ("QUEUED", "EXECUTING")


def test_keep_first_sets_a_column_only_while_it_is_null(unit: Callable[..., Any]) -> None:
    run_id = create(unit)
    first = utcnow() - dt.timedelta(seconds=30)
    run = unit(select_run, run_id)
    unit(transition, run, RunStatus.EXECUTING, utcnow(), {"started_at": KeepFirst(first)})
    run = unit(select_run, run_id)
    unit(transition, run, RunStatus.COMPLETED, utcnow(), {"started_at": KeepFirst(utcnow())})
    assert unit(select_run, run_id)["started_at"] == first


# -- idempotency -------------------------------------------------------------------------


def test_an_idempotency_key_gives_back_the_run_until_it_fails(unit: Callable[..., Any]) -> None:
    first = row(idempotency_key="order-1")
    [(view, cached)] = unit(create_runs, [NewRun(first, 3600)]).runs
    assert not cached
    [(again, cached)] = unit(create_runs, [NewRun(row(idempotency_key="order-1"), 3600)]).runs
    assert cached and again["id"] == view["id"]
    unit(apply_event, event("failed", view["id"], error={"code": "x", "message": "no"}))
    [(fresh, cached)] = unit(create_runs, [NewRun(row(idempotency_key="order-1"), 3600)]).runs
    assert not cached and fresh["id"] != view["id"]
    count = unit(lambda conn: conn.scalar(sa.select(sa.func.count()).select_from(runs)))
    assert count == 2  # the cached trigger left nothing behind
