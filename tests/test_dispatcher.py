"""Callbacks from ``gateway dispatch`` (``WEBHOOK_DISPATCHER``, on by default).

The callback suite of ``tests/test_webhooks.py`` runs on the shared stack,
whose callbacks leave from its dispatcher; ``tests/test_worker_callbacks.py``
runs it again with them sent by the workers. Here is what only the
dispatcher has: a slow receiver holds at most ``WEBHOOK_RECEIVER_CONCURRENCY`` slots; a
dispatcher killed mid-attempt leaves nothing unsent (the attempts it had out
are recorded ``attempt_lost``, then sent again); hand-overs that Redis lost are
found due in the database and sent once; a dispatcher stopped with callbacks
waiting gives them back, and they go out with no lost attempt.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from db.ids import id_time
from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, _redis_db, launch_stack
from tests.helpers import Process, wait_until
from tests.receiver import Answer, Receiver
from tests.test_webhooks import App, register

HANDOVER = "gateway:queue:callbacks"
TAKEN = "gateway:queue:callbacks:taken"


class Dispatched:
    """A stack whose dispatcher the tests stop, kill and start again."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    @property
    def dispatcher(self) -> Process:
        assert self.stack.dispatcher is not None
        return self.stack.dispatcher

    def start(self) -> None:
        self.stack.start_dispatcher()

    def restart(self) -> None:
        self.dispatcher.stop()
        self.start()


@pytest.fixture(scope="module")
def dispatched(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Dispatched]:
    logs = tmp_path_factory.mktemp("logs-dispatch")
    with launch_stack(
        "dispatch",
        databases.new("dispatch"),
        f"{redis_server.url}/{_redis_db(database_url, 20)}",
        logs,
        WEBHOOK_CONCURRENCY="4",
        WEBHOOK_RECEIVER_CONCURRENCY="1",
        # A quarter of it (26 KB) waits for one receiver's turn, at most.
        WEBHOOK_DISPATCH_BUFFER_MB="0.1",
    ) as stack:
        yield Dispatched(stack)


@pytest.fixture
def app(dispatched: Dispatched) -> App:
    return App(dispatched.stack)


def _deliveries(stack: Stack, project_id: str) -> list[tuple[str, str, int]]:
    return [
        (row[0], row[1], row[2])
        for row in stack.query(
            "SELECT id, status, attempts FROM deliveries WHERE project_id = :p ORDER BY id",
            p=project_id,
        )
    ]


def _codes(stack: Stack, delivery_id: str) -> list[str | None]:
    return [
        row[0]
        for row in stack.query(
            "SELECT error_code FROM delivery_attempts WHERE delivery_id = :d ORDER BY number",
            d=delivery_id,
        )
    ]


def _all_delivered(stack: Stack, project_id: str, count: int) -> list[tuple[str, str, int]]:
    def settled() -> list[tuple[str, str, int]] | None:
        rows = _deliveries(stack, project_id)
        done = len(rows) == count and all(status == "delivered" for _, status, _ in rows)
        return rows if done else None

    return wait_until(settled, timeout=60, what=f"{count} deliveries delivered")


def _trigger(app: App, count: int) -> None:
    with app.client() as client:
        for n in range(count):
            answer = client.post("/api/v1/tasks/echo/trigger", json={"payload": {"n": n}})
            assert answer.status_code == 202, answer.text


def test_a_slow_receiver_holds_one_slot_and_others_go_by(
    dispatched: Dispatched, receiver: Receiver
) -> None:
    """``WEBHOOK_RECEIVER_CONCURRENCY=1`` of 4 slots: three slow receivers'
    backlogs take three, and another receiver's callback goes out in the
    fourth while they still wait; a slow receiver never has two calls at once
    (each comes after the one before was answered), and every slow one is
    delivered on its first attempt."""
    slow_app, fast_app = App(dispatched.stack), App(dispatched.stack)
    slow = [f"/slow-{secrets.token_hex(3)}-{n}" for n in range(3)]
    fast = f"/fast-{secrets.token_hex(3)}"
    for path in slow:
        receiver.default(path, Answer(delay=0.3))
        register(slow_app, receiver, path, events=["run.completed"])
    register(fast_app, receiver, fast, events=["run.completed"])
    _trigger(slow_app, 10)
    wait_until(
        lambda: sum(len(receiver.calls_to(p)) for p in slow) >= 3,
        what="the slow backlog to be under way",
    )
    _trigger(fast_app, 1)
    [fast_call] = receiver.wait_calls(fast, 1, timeout=5)
    rows = _all_delivered(dispatched.stack, slow_app.project_id, 30)
    assert {attempts for _, _, attempts in rows} == {1}, rows
    for path in slow:
        arrivals = [call.at for call in receiver.calls_to(path)]
        assert len(arrivals) == 10
        # One slot each: the next call came only once the last was answered.
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        assert min(gaps) >= 0.29, (path, gaps)
        # The fast callback did not wait for the slow backlogs.
        assert fast_call.at < arrivals[-1], path


def _backlog(
    dispatched: Dispatched, receiver: Receiver, name: str, delay: float, count: int
) -> tuple[App, str]:
    """``count`` callbacks to one receiver answering after ``delay`` s, the
    first of them arrived."""
    app = App(dispatched.stack)
    path = f"/{name}-{secrets.token_hex(3)}"
    receiver.default(path, Answer(delay=delay))
    register(app, receiver, path, events=["run.completed"])
    _trigger(app, count)
    receiver.wait_calls(path, 1)
    return app, path


def test_a_receivers_backlog_is_bounded_by_the_bytes_of_its_bodies(
    dispatched: Dispatched, receiver: Receiver
) -> None:
    """``WEBHOOK_DISPATCH_BUFFER_MB=0.1``: while a receiver's one slot is
    taken, its callbacks (about 10 KB each) wait for it only while their
    bodies fit in a quarter of the buffer (26 KB: two). The other five are
    given back to the database (no lease), and every one still goes on its
    first attempt."""
    app = App(dispatched.stack)
    path = f"/heavy-{secrets.token_hex(3)}"
    receiver.script(path, Answer(delay=1.5))  # the first holds the slot
    receiver.default(path, 200)
    register(app, receiver, path, events=["run.completed"])
    with app.client() as client:
        for n in range(8):
            payload = {"n": n, "padding": "x" * 5000}
            answer = client.post("/api/v1/tasks/echo/trigger", json={"payload": payload})
            assert answer.status_code == 202, answer.text
    [first] = receiver.wait_calls(path, 1)
    waiting = (int(0.1 * 1024 * 1024) // 4) // len(first.body)
    assert waiting == 2, len(first.body)

    def given_back() -> bool:
        [(count,)] = dispatched.stack.query(
            "SELECT count(*) FROM deliveries WHERE project_id = :p"
            " AND status = 'pending' AND leased_at IS NULL",
            p=app.project_id,
        )
        return bool(count == 8 - 1 - waiting)

    wait_until(given_back, timeout=10, what="five callbacks given back")
    rows = _all_delivered(dispatched.stack, app.project_id, 8)
    assert {attempts for _, _, attempts in rows} == {1}, rows
    assert len(receiver.calls_to(path)) == 8


def _lease_and_mark(stack: Stack, project_id: str) -> tuple[str, bool, bool]:
    """The project's one delivery: its ID, whether its lease is still the one
    it was created with, and whether a dispatcher has it marked taken."""
    [(delivery_id, leased_at, created_at)] = stack.query(
        "SELECT id, leased_at, created_at FROM deliveries WHERE project_id = :p", p=project_id
    )
    with redis.Redis.from_url(stack.redis_url) as client:
        marked = client.zscore(TAKEN, delivery_id) is not None
    return delivery_id, leased_at == created_at, marked


def test_a_fresh_handover_goes_with_a_mark_in_redis_and_no_claim_in_the_database(
    dispatched: Dispatched, receiver: Receiver
) -> None:
    """A hand-over taken within a quarter of ``RECONCILE_GRACE`` of its
    creation goes out under the lease it was created with, marked taken in
    Redis (no write to the database before it goes); once its attempt is
    recorded the mark is gone. One taken later is claimed in the database
    first, and carries no mark."""
    app = App(dispatched.stack)
    path = f"/fresh-{secrets.token_hex(3)}"
    receiver.default(path, Answer(delay=1.0))
    register(app, receiver, path, events=["run.completed"])
    _trigger(app, 1)
    receiver.wait_calls(path, 1)  # out now, answered in a second
    delivery_id, unclaimed, marked = _lease_and_mark(dispatched.stack, app.project_id)
    assert (unclaimed, marked) == (True, True)
    [(_, status, attempts)] = _all_delivered(dispatched.stack, app.project_id, 1)
    assert (status, attempts) == ("delivered", 1)
    assert _codes(dispatched.stack, delivery_id) == [None]
    wait_until(
        lambda: _lease_and_mark(dispatched.stack, app.project_id)[2] is False,
        what="the mark dropped once the attempt is recorded",
    )

    # Handed over while no dispatcher runs; taken a second later (past a
    # quarter of the 2 s grace, within its 4 s lease): claimed first.
    late = App(dispatched.stack)
    late_path = f"/late-{secrets.token_hex(3)}"
    receiver.default(late_path, Answer(delay=1.0))
    register(late, receiver, late_path, events=["run.completed"])
    dispatched.dispatcher.stop()
    try:
        _trigger(late, 1)
        wait_until(
            lambda: len(_deliveries(dispatched.stack, late.project_id)) == 1,
            what="the delivery written",
        )
        [(late_id, _, _)] = _deliveries(dispatched.stack, late.project_id)
        wait_until(
            lambda: time.time() - id_time(late_id) > 1.0, interval=0.05, what="a second to pass"
        )
    finally:
        dispatched.start()
    receiver.wait_calls(late_path, 1)
    _, unclaimed, marked = _lease_and_mark(dispatched.stack, late.project_id)
    assert (unclaimed, marked) == (False, False)
    _all_delivered(dispatched.stack, late.project_id, 1)
    assert _codes(dispatched.stack, late_id) == [None]


def test_a_killed_dispatcher_leaves_nothing_unsent(
    dispatched: Dispatched, receiver: Receiver
) -> None:
    """SIGKILL with attempts out: when their leases run out a new dispatcher
    records each as ``attempt_lost`` and sends it again; every one arrives."""
    dispatcher = dispatched.dispatcher
    assert dispatcher.popen is not None
    pid = dispatcher.popen.pid
    frozen = threading.Event()

    def freeze() -> None:
        # The first attempt is out and unanswered: stop the dispatcher right
        # here, so the kill below lands while it waits, however slow the
        # machine is.
        if not frozen.is_set():
            os.kill(pid, signal.SIGSTOP)
            frozen.set()

    app = App(dispatched.stack)
    path = f"/killed-{secrets.token_hex(3)}"
    receiver.default(path, Answer(delay=1.0, arrived=freeze))
    register(app, receiver, path, events=["run.completed"])
    _trigger(app, 4)
    assert frozen.wait(30), "no attempt arrived"
    dispatcher.stop(signal.SIGKILL)
    dispatched.start()
    receiver.default(path, Answer())
    rows = _all_delivered(dispatched.stack, app.project_id, 4)
    lost = [d for d, _, _ in rows if "attempt_lost" in _codes(dispatched.stack, d)]
    # The one out when the process died is among them (the others it had
    # taken, waiting their receiver's turn, count as out too).
    out_at_kill = receiver.calls_to(path)[0].headers["webhook-id"]
    assert out_at_kill in lost, rows
    for delivery_id in lost:
        assert _codes(dispatched.stack, delivery_id)[0] == "attempt_lost"
    received = {c.headers["webhook-id"] for c in receiver.calls_to(path)}
    assert received == {d for d, _, _ in rows}


def test_handovers_that_redis_lost_are_sent_once_from_the_database(
    dispatched: Dispatched, receiver: Receiver
) -> None:
    """The dispatcher away, its hand-over list gone (a flush, a Redis without
    its AOF): the deliveries are found due once their lease is over, and each
    goes out once, with one attempt and none lost."""
    app = App(dispatched.stack)
    path = f"/lost-{secrets.token_hex(3)}"
    register(app, receiver, path, events=["run.completed"])
    dispatched.dispatcher.stop()
    try:
        _trigger(app, 5)
        wait_until(
            lambda: len(_deliveries(dispatched.stack, app.project_id)) == 5,
            what="five deliveries written",
        )
        with redis.Redis.from_url(dispatched.stack.redis_url) as client:
            assert client.llen(HANDOVER) >= 5
            client.delete(HANDOVER)
    finally:
        dispatched.start()
    rows = _all_delivered(dispatched.stack, app.project_id, 5)
    assert {attempts for _, _, attempts in rows} == {1}, rows
    assert len(receiver.calls_to(path)) == 5


def _metric(stack: Stack, name: str) -> float:
    text = httpx.get(stack.base_url + "/metrics", timeout=10).text
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def _warnings(stack: Stack) -> int:
    """How many times the gateway has said that no dispatcher takes callbacks."""
    return stack.gateway.log_path.read_text(errors="replace").count("wait for a dispatcher")


def test_callbacks_no_dispatcher_takes_are_told_and_go_once_one_runs(
    dispatched: Dispatched, receiver: Receiver
) -> None:
    """No dispatcher running: the hand-overs wait, ``/metrics`` shows how
    many and for how long, and once the oldest has waited past an attempt's
    lease (4 s here) the gateway's log says no dispatcher takes them. A
    dispatcher started then sends each once."""
    app = App(dispatched.stack)
    path = f"/nobody-{secrets.token_hex(3)}"
    register(app, receiver, path, events=["run.completed"])
    dispatched.dispatcher.stop()
    try:
        assert _metric(dispatched.stack, "gateway_callbacks_handed_over") == 0
        warned = _warnings(dispatched.stack)
        _trigger(app, 3)
        wait_until(
            lambda: _metric(dispatched.stack, "gateway_callbacks_handed_over") == 3,
            what="three callbacks handed over",
        )
        wait_until(
            lambda: _metric(dispatched.stack, "gateway_callbacks_waiting_seconds") > 4,
            what="the oldest to wait past an attempt's lease",
        )
        wait_until(
            lambda: _warnings(dispatched.stack) > warned,
            what="the gateway to warn that no dispatcher takes callbacks",
        )
        assert receiver.calls_to(path) == []
    finally:
        dispatched.start()
    rows = _all_delivered(dispatched.stack, app.project_id, 3)
    assert {attempts for _, _, attempts in rows} == {1}, rows
    assert len(receiver.calls_to(path)) == 3
    assert _metric(dispatched.stack, "gateway_callbacks_handed_over") == 0
    assert _metric(dispatched.stack, "gateway_callbacks_waiting_seconds") == 0


def test_a_stopped_dispatcher_gives_back_what_waited_its_turn(
    dispatched: Dispatched, receiver: Receiver
) -> None:
    """SIGTERM while a slow receiver's callbacks wait for its one slot: the
    one out ends and is recorded, the waiting ones are given back, and the
    next dispatcher sends each on its first attempt (none counted lost)."""
    app, path = _backlog(dispatched, receiver, "stopped", 0.5, 6)
    dispatched.restart()
    rows = _all_delivered(dispatched.stack, app.project_id, 6)
    assert {attempts for _, _, attempts in rows} == {1}, [
        (d, _codes(dispatched.stack, d)) for d, _, attempts in rows if attempts > 1
    ]
    assert len(receiver.calls_to(path)) == 6


def test_dispatch_refuses_to_start_when_the_gateway_sends_from_workers(
    dispatched: Dispatched, tmp_path: Path
) -> None:
    process = Process(
        "dispatch-off",
        ["-m", "gateway", "dispatch"],
        {**dispatched.stack.env, "WEBHOOK_DISPATCHER": "false"},
        tmp_path,
    ).start()
    assert process.popen is not None
    assert process.popen.wait(30) != 0
    assert "WEBHOOK_DISPATCHER is off" in process.log_tail()
