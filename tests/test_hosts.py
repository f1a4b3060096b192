"""Several hosts: PostgreSQL, Redis, two gateways behind a balancer, two
workers and a client app, each in a network namespace of its own on one switch
(tests/netns.py), with addresses that exist only inside them.

The hosts run the Procfile's commands (``release``, then ``web`` on the
gateway hosts, ``worker`` and ``dispatch`` on the worker hosts). Through
them: a crop stored through one gateway is fetched through the other; a worker
host is cut off mid-run and comes back; a gateway host is cut off while the
other serves; the PostgreSQL host is cut off for ten seconds; the PostgreSQL
server is restarted for real. Then every run is final once, every callback is
delivered, and no run was held by the lost worker host past the heartbeat
timeout.

It needs root, iproute2 and PostgreSQL's server binaries; it says which is
missing and skips, except under CI=true, where it fails instead.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import hashlib
import io
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from PIL import Image

from gateway.cli.embedded_redis import find_redis_server
from tests import netns
from tests.conftest import TEST_SECRET
from tests.helpers import ROOT, child_env, db_query
from tests.postgres import Postgres
from tests.postgres import missing as postgres_missing
from tests.receiver import Receiver

T = TypeVar("T")

GATEWAY = str(Path(sys.executable).parent / "gateway")
FINAL = {"COMPLETED", "FAILED", "CANCELED", "EXPIRED", "TIMED_OUT"}
HEARTBEAT_TIMEOUT = 4.0
RECONCILE_INTERVAL = 1.0


def _missing() -> str | None:
    return netns.missing() or postgres_missing()


def _procfile() -> dict[str, list[str]]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {
        name: [GATEWAY, *shlex.split(command)[1:]]
        for name, command in (line.split(":", 1) for line in lines if line)
    }


def _png() -> bytes:
    image = Image.new("RGB", (120, 80), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 60, 80))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class Deployment:
    """The hosts, their processes, and a client on a host of its own."""

    def __init__(self, lab: netns.Lab, logs: Path) -> None:
        self.lab = lab
        self.logs = logs
        for name, octet in (
            ("pg", 2),
            ("redis", 3),
            ("lb", 5),
            ("gw1", 11),
            ("gw2", 12),
            ("wk1", 21),
            ("wk2", 22),
            ("app", 100),
        ):
            lab.add(name, octet)
        self.address = {name: host.address for name, host in lab.hosts.items()}
        self.postgres = Postgres(lab, "pg")
        self.postgres.start()
        lab.popen(
            "redis",
            [
                find_redis_server(),
                "--port",
                "6379",
                "--bind",
                self.address["redis"],
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            log=logs / "redis.log",
        )
        self.balancer = f"http://{self.address['lb']}"
        self.env = child_env(
            DATABASE_URL=self.postgres.url,
            REDIS_URL=f"redis://{self.address['redis']}:6379/0",
            GATEWAY_SECRET_KEY=TEST_SECRET,
            PORT="8000",
            # Workers report, and links point, through the balancer.
            GATEWAY_URL=self.balancer,
            WEBHOOK_ALLOWED_NETWORKS=lab.network,
            WEBHOOK_RETRY_SCHEDULE="0,0.5,1,2,4,8,8,8,8,8",
            WEBHOOK_TIMEOUT="3",
            HEARTBEAT_INTERVAL="0.5",
            HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
            RECONCILE_INTERVAL=str(RECONCILE_INTERVAL),
            RECONCILE_GRACE="3",
            WORKER_SHUTDOWN_GRACE="2",
        )
        self.env.pop("ARTIFACT_STORE", None)  # PostgreSQL's default: the database
        self.app = lab.client("app")
        procfile = _procfile()
        release = lab.run("gw1", procfile["release"], env=self.env, cwd=ROOT)
        assert release.returncode == 0, release.stderr
        created = lab.run("gw1", [GATEWAY, "keys", "create", "hosts"], env=self.env, cwd=ROOT)
        assert created.returncode == 0, created.stderr
        self.key = created.stdout.split()[-1]
        self.processes = {}
        for name in ("gw1", "gw2"):
            self.processes[name] = lab.popen(
                name, procfile["web"], env=self.env, log=logs / f"{name}.log", cwd=ROOT
            )
        lab.popen(
            "lb",
            [
                sys.executable,
                "-m",
                "tests.balancer",
                "--listen",
                f"{self.address['lb']}:80",
                "--to",
                f"{self.address['gw1']}:8000",
                "--to",
                f"{self.address['gw2']}:8000",
            ],
            env=self.env,
            log=logs / "lb.log",
            cwd=ROOT,
        )
        for name in ("wk1", "wk2"):
            self.processes[name] = lab.popen(
                name, procfile["worker"], env=self.env, log=logs / f"{name}.log", cwd=ROOT
            )
            # A callback dispatcher beside each worker: two side by side on
            # PostgreSQL, each delivery sent by one.
            self.processes[f"{name}-dispatch"] = lab.popen(
                name,
                procfile["dispatch"],
                env=self.env,
                log=logs / f"{name}-dispatch.log",
                cwd=ROOT,
            )
        # No keep-alive: each call takes the balancer afresh, as a new client would.
        self.http = httpx.Client(
            headers={"authorization": f"Bearer {self.key}"},
            timeout=httpx.Timeout(10.0, read=45.0),
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        for name in ("gw1", "gw2"):
            self.wait(lambda name=name: self.ready(name), what=f"{name} to be ready")
        self.receiver = self.on(lambda: Receiver(host=self.address["app"]).start())
        self.run_ids: list[str] = []

    # -- calls from the app's host ---------------------------------------------------

    def on(self, fn: Callable[[], T]) -> T:
        return netns.on(self.app, fn)

    def wait(self, predicate: Callable[[], Any], *, timeout: float = 60, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.on(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log_tails()}")
            time.sleep(0.2)

    def url(self, host: str | None = None) -> str:
        return f"http://{self.address[host]}:8000" if host else self.balancer

    def ready(self, host: str) -> bool:
        try:
            return self.http.get(self.url(host) + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def trigger(
        self, task: str, payload: Any, *, via: str | None = None, key: str | None = None
    ) -> str:
        def call() -> str:
            answer = self.http.post(
                f"{self.url(via)}/api/v1/tasks/{task}/trigger",
                json={"payload": payload, "options": {"idempotency_key": key} if key else {}},
            )
            assert answer.status_code in (200, 202), answer.text
            return str(answer.json()["id"])

        run_id = self.on(call)
        self.run_ids.append(run_id)
        return run_id

    def get(self, run_id: str, *, via: str | None = None, wait: float = 0) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            answer = self.http.get(f"{self.url(via)}/api/v1/runs/{run_id}", params={"wait": wait})
            assert answer.status_code == 200, answer.text
            found: dict[str, Any] = answer.json()
            return found

        return self.on(call)

    def finals(self, run_ids: list[str], timeout: float = 90) -> list[dict[str, Any]]:
        """Each run once it is final (long-polls side by side)."""
        deadline = time.monotonic() + timeout

        def final(run_id: str) -> dict[str, Any]:
            while time.monotonic() < deadline:
                try:
                    run = self.get(run_id, wait=20)
                except (httpx.HTTPError, AssertionError):
                    time.sleep(0.5)
                    continue
                if run["is_final"]:
                    return run
            raise AssertionError(f"{run_id} is not final\n{self.log_tails()}")

        with concurrent.futures.ThreadPoolExecutor(len(run_ids)) as pool:
            return list(pool.map(final, run_ids))

    def query(self, sql: str, **params: Any) -> list[Any]:
        url = self.postgres.url.replace("postgresql://", "postgresql+asyncpg://")
        return self.on(lambda: db_query(url, sql, params))

    def log_tails(self) -> str:
        tails = []
        for path in sorted(self.logs.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(tails)

    def close(self) -> None:
        self.http.close()
        receiver = getattr(self, "receiver", None)
        if receiver is not None:
            receiver.stop()
        self.lab.close()
        self.postgres.close()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the multi-host test, and cannot here: {reason}")
        pytest.skip(f"the multi-host test cannot run here: {reason}")
    lab = netns.Lab()
    made: Deployment | None = None
    try:
        made = Deployment(lab, tmp_path)
        yield made
    finally:
        if made is not None:
            made.close()
        else:
            lab.close()


def _when(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_several_hosts_survive_cut_links_and_a_database_restart(deployment: Deployment) -> None:
    d = deployment
    path = "/hooks"
    endpoint = d.on(
        lambda: d.http.post(d.url() + "/api/v1/webhooks", json={"url": d.receiver.url(path)})
    )
    assert endpoint.status_code == 201, endpoint.text
    d.receiver.verify_with(path, endpoint.json()["secret"])

    print(time.strftime("%X"), "1. A crop", flush=True)
    # 1. A crop through one gateway; its artifact through the other.
    image = _png()
    crop = d.trigger(
        "crop-image",
        {
            "image": "data:image/png;base64," + base64.b64encode(image).decode(),
            "x": 0,
            "y": 0,
            "width": 60,
            "height": 80,
        },
        via="gw1",
    )
    done = d.get(crop, via="gw1", wait=30)
    assert done["status"] == "COMPLETED", done
    link = done["output"]["url"]
    assert link.startswith(d.balancer)
    fetched = d.on(lambda: httpx.get(link.replace(d.balancer, d.url("gw2")), timeout=10))
    assert fetched.status_code == 200, fetched.text
    assert hashlib.sha256(fetched.content).hexdigest() == done["output"]["sha256"]

    print(time.strftime("%X"), "2. A worker host", flush=True)
    # 2. A worker host cut off mid-run, and back: its runs go to the other
    #    worker once the heartbeat timeout says they are lost.
    wk1 = f":{d.processes['wk1'].pid}"
    sleepers: list[str] = []

    def on_wk1() -> bool:
        runs = [d.get(r) for r in sleepers]
        return any(
            run["status"] == "EXECUTING" and run["attempts"][-1]["worker_id"].endswith(wk1)
            for run in runs
        )

    for _ in range(5):
        sleepers += [d.trigger("sleep", {"seconds": 2.5}) for _ in range(6)]
        try:
            d.wait(on_wk1, timeout=5, what="a run to start on the first worker host")
            break
        except AssertionError:
            continue
    held = [r for r in sleepers if (run := d.get(r))["attempts"][-1]["worker_id"].endswith(wk1)]
    assert held, "no run started on the first worker host"
    cut_at = dt.datetime.now(dt.UTC)
    with d.lab.cut_off("wk1"):
        finals = d.finals(sleepers)
    for run in finals:
        assert run["status"] == "COMPLETED", run
    for run in (r for r in finals if r["id"] in held):
        lost = run["attempts"][0]
        assert lost["worker_id"].endswith(wk1) and lost["error"]["code"] == "worker_lost", run
        assert not run["attempts"][-1]["worker_id"].endswith(wk1)
        # Held no longer than the heartbeat timeout (and one pass to notice).
        held_for = (_when(lost["finished_at"]) - cut_at).total_seconds()
        assert held_for <= HEARTBEAT_TIMEOUT + RECONCILE_INTERVAL + 1.5, (held_for, run)
        print(f"  {run['id']} held by the cut worker host for {held_for:.1f} s", flush=True)

    print(time.strftime("%X"), "3. A gateway host", flush=True)
    # 3. A gateway host cut off while the other serves.
    with d.lab.cut_off("gw1"):
        echoes = [d.trigger("echo", {"n": n}) for n in range(8)]
        for run in d.finals(echoes):
            assert run["status"] == "COMPLETED", run
    d.wait(lambda: d.ready("gw1"), what="the first gateway to be back")

    print(time.strftime("%X"), "4. The PostgreSQL host", flush=True)
    # 4. The PostgreSQL host cut off for ten seconds, with runs in flight and
    #    triggers sent meanwhile (they wait, or answer 503 and are sent again
    #    with their idempotency key).
    before = [d.trigger("sleep", {"seconds": 1}) for _ in range(4)]
    during: list[concurrent.futures.Future[str]] = []
    keys = [f"during-outage-{n}" for n in range(4)]
    senders = concurrent.futures.ThreadPoolExecutor(4)
    with d.lab.cut_off("pg"):
        started = time.monotonic()
        for key in keys:
            during.append(senders.submit(d.trigger, "echo", {"key": key}, key=key))
        time.sleep(max(0.0, 10 - (time.monotonic() - started)))  # the outage itself
    senders.shutdown(wait=False)
    again = []
    for key, future in zip(keys, during, strict=True):
        try:
            again.append(future.result(60))
        except AssertionError:  # 503 while the database was away: send it again
            again.append(d.trigger("echo", {"key": key}, key=key))
    for run in d.finals(before + again):
        assert run["status"] == "COMPLETED", run

    print(time.strftime("%X"), "5. The PostgreSQL server", flush=True)
    # 5. The PostgreSQL server restarted for real, with runs executing.
    restarting = [d.trigger("sleep", {"seconds": 1.5}) for _ in range(4)]
    d.wait(
        lambda: all(d.get(r)["status"] == "EXECUTING" for r in restarting),
        what="the runs to start",
    )
    d.postgres.restart()
    for run in d.finals(restarting):
        assert run["status"] == "COMPLETED", run

    print(time.strftime("%X"), "Every run final once", flush=True)
    # Every run final once; every callback delivered.
    ids = sorted(set(d.run_ids))
    rows = d.query(
        "SELECT run_id, COUNT(*) FROM run_transitions WHERE to_status IN "
        "('COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT') GROUP BY run_id"
    )
    finals_of = {run_id: count for run_id, count in rows}
    assert {i: finals_of.get(i, 0) for i in ids} == dict.fromkeys(ids, 1)

    def delivered() -> bool:
        states = dict(d.query("SELECT run_id, status FROM deliveries WHERE run_id IS NOT NULL"))
        return all(states.get(i) == "delivered" for i in ids)

    d.wait(delivered, timeout=90, what="every callback to be delivered")
    sent = {c.json()["data"]["id"] for c in d.receiver.calls_to(path) if c.verified_by}
    assert set(ids) <= sent
