"""The central units without Redis or processes: the outbox, the reconciler's
decisions, the unit runner's retries and counting, and the worker's report
batching (against a recording gateway served in-process over ASGI)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import uvicorn
from sqlmodel import SQLModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from db.engine import Database
from db.ids import new_id
from db.models import Delivery, EndpointSecret, Project, RunStatus
from db.types import utcnow
from gateway.background.reconciler import due_deliveries, due_runs
from gateway.metrics import RUN_TRANSITIONS
from gateway.notify import RunNotifier
from gateway.runs.create import NewRun, create_runs
from gateway.runs.errors import LostRace
from gateway.runs.reports.one_by_one import apply_event
from gateway.services.units import UnitRunner
from gateway.settings import Settings
from jobs.protocol import ARTIFACTS_PATH, EVENTS_PATH, SIGNATURE_HEADER, verify_request
from jobs.report import (
    GatewayUnreachable,
    Reporter,
    ReportRejected,
    gateway_session,
    make_event,
    refused_fallback,
)
from tests.unit.conftest import PROJECT
from tests.unit.test_state_machine import create, endpoint, event, row, status
from webhooks.dispatch import DeliveryDispatcher
from webhooks.outbox import create_event_deliveries, create_run_deliveries

Unit = Callable[..., Any]
deliveries = Delivery.__table__  # type: ignore[attr-defined]
runs_table = sa.table(
    "runs", sa.column("id"), sa.column("status"), sa.column("held"), sa.column("updated_at")
)


def deliveries_of(unit: Unit, run_id: str | None = None) -> list[dict[str, Any]]:
    def read(conn: sa.Connection) -> list[dict[str, Any]]:
        query = sa.select(deliveries)
        if run_id is not None:
            query = query.where(deliveries.c.run_id == run_id)
        return [dict(r) for r in conn.execute(query).mappings()]

    result: list[dict[str, Any]] = unit(read)
    return result


def add_secret(unit: Unit, endpoint_id: str, secret: str, expires_at: dt.datetime | None) -> None:
    unit(
        lambda conn: conn.execute(
            EndpointSecret.__table__.insert(),  # type: ignore[attr-defined]
            {
                "endpoint_id": endpoint_id,
                "secret": secret,
                "created_at": utcnow(),
                "expires_at": expires_at,
            },
        )
    )


# -- the outbox ----------------------------------------------------------------------


def test_a_final_event_is_written_for_each_endpoint_that_wants_it_and_the_runs_own_url(
    unit: Unit,
) -> None:
    wants_all = endpoint(unit, ["*"])
    wants_failed = endpoint(unit, ["run.failed"])
    add_secret(unit, wants_all, "whsec_old", utcnow() - dt.timedelta(seconds=1))
    add_secret(unit, wants_all, "whsec_new", None)
    run_id = create(unit, callback_url="https://app.example/own")
    now = utcnow()

    def write(conn: sa.Connection) -> list[Any]:
        run = dict(
            conn.execute(sa.text("SELECT * FROM runs WHERE id = :i"), {"i": run_id})
            .mappings()
            .one()
        )
        return create_run_deliveries(conn, run, lambda: {"id": run_id}, "run.completed", now)

    out = unit(write)
    assert sorted(o.receiver for o in out) == sorted([wants_all, "https://app.example/own"])
    [to_endpoint] = [o for o in out if o.receiver == wants_all]
    # Only the secrets that sign now, newest first; one body for every receiver.
    assert to_endpoint.secrets == ("whsec_new",)
    assert len({o.body for o in out}) == 1
    assert json.loads(to_endpoint.body)["type"] == "run.completed"
    [to_url] = [o for o in out if o.receiver != wants_all]
    assert to_url.secrets[0].startswith("whsec_")
    rows = deliveries_of(unit, run_id)
    assert {r["endpoint_id"] for r in rows} == {wants_all, None}
    assert wants_failed not in {r["endpoint_id"] for r in rows}
    assert all(r["status"] == "pending" for r in rows)


def test_run_started_goes_only_to_endpoints_that_name_it(unit: Unit) -> None:
    endpoint(unit, ["*"])
    names_it = endpoint(unit, ["run.started"])
    run_id = create(unit, callback_url="https://app.example/own")

    def write(conn: sa.Connection) -> list[Any]:
        run = dict(
            conn.execute(sa.text("SELECT * FROM runs WHERE id = :i"), {"i": run_id})
            .mappings()
            .one()
        )
        return create_run_deliveries(conn, run, lambda: {}, "run.started", utcnow())

    assert [o.receiver for o in unit(write)] == [names_it]


def test_the_outbox_commits_with_the_transition_or_not_at_all(unit: Unit) -> None:
    endpoint(unit, ["*"])
    run_id = create(unit)
    unit(apply_event, event("started", run_id))

    def completes_then_fails(conn: sa.Connection) -> None:
        done = apply_event(conn, event("completed", run_id, output={"ok": True}))
        assert done.effects.outgoing  # written in this transaction
        raise RuntimeError("the unit fails after writing")

    with pytest.raises(RuntimeError):
        unit(completes_then_fails)
    assert status(unit, run_id)["status"] == "EXECUTING"
    assert deliveries_of(unit, run_id) == []
    unit(apply_event, event("completed", run_id, output={"ok": True}))
    assert [r["event_type"] for r in deliveries_of(unit, run_id)] == ["run.completed"]


def test_an_event_of_no_run_skips_endpoints_that_filter_on_tasks(unit: Unit) -> None:
    plain = endpoint(unit, ["waitpoint.completed"])
    filtered = endpoint(unit, ["waitpoint.completed"])
    unit(
        lambda conn: conn.execute(
            sa.text("UPDATE webhook_endpoints SET tasks = :t WHERE id = :i"),
            {"t": json.dumps(["echo"]), "i": filtered},
        )
    )
    out = unit(create_event_deliveries, PROJECT, "waitpoint.completed", {"id": "wp_1"}, utcnow())
    assert [o.receiver for o in out] == [plain]


# -- the reconciler's decisions -------------------------------------------------------


def age(unit: Unit, run_id: str, seconds: float, **values: Any) -> None:
    unit(
        lambda conn: conn.execute(
            runs_table.update()
            .where(runs_table.c.id == run_id)
            .values(updated_at=utcnow() - dt.timedelta(seconds=seconds), **values)
        )
    )


def test_the_reconciler_takes_old_queued_runs_with_their_limits_and_priority(unit: Unit) -> None:
    old = create(unit, max_duration=3, priority=60)
    young = create(unit)
    held = create(unit)
    running = create(unit)
    unit(apply_event, event("started", running))
    age(unit, old, 120)
    age(unit, held, 120, held=True)
    age(unit, running, 120)
    jobs = unit(due_runs, utcnow() - dt.timedelta(seconds=30))
    assert [job.run_id for job in jobs] == [old]
    assert young not in [job.run_id for job in jobs]
    [job] = jobs
    assert job.options == {"max_duration": 3} and job.priority == 60
    assert job.project_id == PROJECT


def test_the_reconciler_takes_due_deliveries_with_no_attempt_out_or_one_lost(unit: Unit) -> None:
    endpoint(unit, ["*"])
    ids = {}
    for name in ("due", "leased", "lease_lost", "not_due", "delivered"):
        run_id = create(unit)
        unit(apply_event, event("started", run_id))
        unit(apply_event, event("completed", run_id, output={}))
        [delivery] = deliveries_of(unit, run_id)
        ids[name] = delivery["id"]
    now = utcnow()
    changes = {
        # A new delivery is leased at birth (its first attempt goes at commit);
        # a retry waiting for its time holds no lease.
        "due": {"next_attempt_at": now - dt.timedelta(minutes=5), "leased_at": None},
        "leased": {"next_attempt_at": now - dt.timedelta(minutes=5), "leased_at": now},
        "lease_lost": {
            "next_attempt_at": now - dt.timedelta(minutes=5),
            "leased_at": now - dt.timedelta(hours=1),
        },
        "not_due": {"next_attempt_at": now + dt.timedelta(minutes=5)},
        "delivered": {"next_attempt_at": now - dt.timedelta(minutes=5), "status": "delivered"},
    }
    for name, values in changes.items():
        unit(
            lambda conn, n=name, v=values: conn.execute(
                deliveries.update().where(deliveries.c.id == ids[n]).values(**v)
            )
        )
    found = unit(due_deliveries, now - dt.timedelta(seconds=30), now - dt.timedelta(minutes=10))
    assert sorted(d["id"] for d in found) == sorted([ids["due"], ids["lease_lost"]])


# -- the unit runner -----------------------------------------------------------------


def runner(tmp_path: Path) -> tuple[UnitRunner, Database]:
    """A unit runner on a SQLite file; units that queue nothing never reach Redis."""
    url = f"sqlite:///{tmp_path / 'units.db'}"
    made = sa.create_engine(url)
    SQLModel.metadata.create_all(made)
    with made.begin() as conn:
        conn.execute(
            Project.__table__.insert(),  # type: ignore[attr-defined]
            {"id": PROJECT, "name": "unit", "created_at": utcnow()},
        )
    made.dispose()
    settings = Settings(secret_key="s" * 20, database_url=url, redis_url="redis://127.0.0.1:1")
    db = Database(settings.database_url)
    redis: Any = None  # no unit below queues a job
    units = UnitRunner(
        db=db,
        redis=redis,
        notifier=RunNotifier(redis),
        dispatcher=DeliveryDispatcher(db=db, redis=redis, settings=settings),
        settings=settings,
    )
    return units, db


def transitions(task: str, to: RunStatus) -> float:
    value = RUN_TRANSITIONS.labels(task=task, status=to.value)._value.get()
    return float(value)


def test_a_unit_that_lost_a_race_runs_again_and_its_transitions_count_once(
    tmp_path: Path,
) -> None:
    task = f"unit-{new_id('t')}"
    tries: list[int] = []

    async def scenario() -> str:
        units, db = runner(tmp_path)
        try:
            [(view, _)] = (await units.write(create_runs, [NewRun(row(task=task), 3600)])).runs
            run_id = str(view["id"])

            def start(conn: sa.Connection) -> Any:
                done = apply_event(conn, event("started", run_id))
                tries.append(1)
                if len(tries) == 1:
                    raise LostRace(run_id)  # rolled back, with its transition
                return done

            await units.write_until_settled(start)
            return run_id
        finally:
            await db.dispose()

    before = transitions(task, RunStatus.EXECUTING)
    asyncio.run(scenario())
    assert len(tries) == 2
    assert transitions(task, RunStatus.EXECUTING) - before == 1


def test_a_unit_that_always_loses_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    calls: list[int] = []

    def never(conn: sa.Connection) -> None:
        calls.append(1)
        raise LostRace("run_x")

    async def scenario() -> None:
        units, db = runner(tmp_path)
        try:
            await units.write_until_settled(never, tries=3)
        finally:
            await db.dispose()

    with pytest.raises(RuntimeError, match="lost the race 3 times"):
        asyncio.run(scenario())
    assert len(calls) == 3


# -- the worker's report batching ------------------------------------------------------


SECRET = "r" * 24


class RecordingGateway:
    """Answers ``POST /internal/events`` as the gateway does, one answer per
    event in order, after checking the signature; can hold requests open."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.arrived = asyncio.Event()
        self.too_large_above = 0
        self.refuse_run: str | None = None
        self.fail_with: int | None = None
        self.app = Starlette(
            routes=[
                Route(EVENTS_PATH, self.events, methods=["POST"]),
                Route(ARTIFACTS_PATH, self.artifact, methods=["POST"]),
            ]
        )

    @staticmethod
    async def _verified_body(request: Request) -> bytes:
        """The body, once the signature is checked over the path and the query
        string as they arrived."""
        body = await request.body()
        verify_request(
            SECRET,
            request.headers.get(SIGNATURE_HEADER),
            "POST",
            request.url.path,
            request.scope["query_string"].decode(),
            body,
            max_age=60,
        )
        return body

    async def artifact(self, request: Request) -> Response:
        body = await self._verified_body(request)
        return JSONResponse({"size": len(body), "type": request.query_params["content_type"]})

    async def events(self, request: Request) -> Response:
        body = await self._verified_body(request)
        batch = json.loads(body)["events"]
        self.batches.append(batch)
        self.arrived.set()
        await self.release.wait()
        if self.fail_with:
            return JSONResponse({"error": {"code": "x"}}, status_code=self.fail_with)
        if self.too_large_above and len(batch) > self.too_large_above:
            return JSONResponse({"error": {"code": "payload_too_large"}}, status_code=413)
        answers = [
            {"error": {"code": "invalid_event"}, "status_code": 422}
            if e["run_id"] == self.refuse_run
            else {"ok": True, "run_id": e["run_id"]}
            for e in batch
        ]
        return JSONResponse({"answers": answers})


@contextlib.asynccontextmanager
async def reporter(gateway: RecordingGateway) -> AsyncIterator[Reporter]:
    """A reporter to ``gateway``, served by uvicorn on a loopback port (bound
    and listening before the server starts, so nothing waits for it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(gateway.app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    session = gateway_session()
    try:
        yield Reporter(f"http://127.0.0.1:{sock.getsockname()[1]}", SECRET, session=session)
    finally:
        await session.close()
        server.should_exit = True
        await serving


def started(run_id: str) -> dict[str, Any]:
    return make_event("started", run_id=run_id, attempt=1, worker_id="w")


def test_a_lone_report_leaves_at_once_signed_for_its_path() -> None:
    async def scenario() -> None:
        gateway = RecordingGateway()
        async with reporter(gateway) as sender:
            answer = await sender.send_once(started("run_a"))
        assert answer == {"ok": True, "run_id": "run_a"}
        assert [[e["run_id"] for e in b] for b in gateway.batches] == [["run_a"]]

    asyncio.run(scenario())


def test_reports_made_while_one_is_out_go_together_and_each_gets_its_answer() -> None:
    async def scenario() -> None:
        gateway = RecordingGateway()
        gateway.release.clear()
        async with reporter(gateway) as sender:
            first = asyncio.ensure_future(sender.send_once(started("run_1")))
            await gateway.arrived.wait()
            rest = [asyncio.ensure_future(sender.send_once(started(f"run_{n}"))) for n in (2, 3, 4)]
            await asyncio.sleep(0)  # they queue behind the request that is out
            gateway.release.set()
            answers = await asyncio.gather(first, *rest)
            assert [a["run_id"] for a in answers] == ["run_1", "run_2", "run_3", "run_4"]
            assert [[e["run_id"] for e in b] for b in gateway.batches] == [
                ["run_1"],
                ["run_2", "run_3", "run_4"],
            ]

    asyncio.run(scenario())


def test_a_batch_too_large_for_the_gateway_is_sent_again_one_by_one() -> None:
    async def scenario() -> None:
        gateway = RecordingGateway()
        gateway.release.clear()
        gateway.too_large_above = 1
        async with reporter(gateway) as sender:
            first = asyncio.ensure_future(sender.send_once(started("run_1")))
            await gateway.arrived.wait()
            rest = [asyncio.ensure_future(sender.send_once(started(f"run_{n}"))) for n in (2, 3)]
            await asyncio.sleep(0)
            gateway.release.set()
            answers = await asyncio.gather(first, *rest)
            assert [a["run_id"] for a in answers] == ["run_1", "run_2", "run_3"]
            sizes = [len(b) for b in gateway.batches]
            assert sizes == [1, 2, 1, 1]

    asyncio.run(scenario())


def test_a_refused_event_fails_alone_and_a_failed_request_fails_its_whole_batch() -> None:
    async def scenario() -> None:
        gateway = RecordingGateway()
        gateway.release.clear()
        gateway.refuse_run = "run_bad"
        async with reporter(gateway) as sender:
            first = asyncio.ensure_future(sender.send_once(started("run_1")))
            await gateway.arrived.wait()
            good = asyncio.ensure_future(sender.send_once(started("run_good")))
            bad = asyncio.ensure_future(sender.send_once(started("run_bad")))
            await asyncio.sleep(0)
            gateway.release.set()
            assert (await first)["run_id"] == "run_1"
            assert (await good)["run_id"] == "run_good"
            with pytest.raises(ReportRejected) as refused:
                await bad
            assert refused.value.status_code == 422

            gateway.fail_with = 503
            with pytest.raises(GatewayUnreachable):
                await sender.send_once(started("run_2"))

    asyncio.run(scenario())


def test_a_call_with_a_query_arrives_as_signed() -> None:
    async def scenario() -> None:
        async with reporter(RecordingGateway()) as sender:
            params = {"run_id": "run_1", "content_type": "image/jpeg", "note": "a b&c"}
            answer = await sender.post(ARTIFACTS_PATH, b"xyz", "image/jpeg", params)
            assert answer.json() == {"size": 3, "type": "image/jpeg"}

    asyncio.run(scenario())


def test_a_refused_closing_report_falls_back_to_a_failed_one_that_says_why() -> None:
    completed = make_event("completed", run_id="run_1", attempt=2, worker_id="w", output={})
    fallback = refused_fallback(completed, ReportRejected(413, "too large"))
    assert fallback is not None
    assert fallback["type"] == "failed" and fallback["attempt"] == 2
    assert fallback["error"]["code"] == "output_too_large"
    other = refused_fallback(completed, ReportRejected(422, "no"))
    assert other is not None and other["error"]["code"] == "report_rejected"
    assert refused_fallback(started("run_1"), ReportRejected(422, "no")) is None
