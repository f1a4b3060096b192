"""The connections real deployments put in between: PgBouncer in transaction
pooling, PostgreSQL over TLS, Redis over TLS (docs/operations.md#connections).

Each runs a whole stack (gateway, worker, callbacks, a durable task's child
runs) through the real thing: the distribution's ``pgbouncer``, a PostgreSQL
server of the test's own with ``ssl=on`` and ``hostssl``-only access, and the
distribution's ``redis-server`` (the embedded one has no TLS) on a TLS port
alone. Certificates are made here, from a CA of the test's own. Where a binary
is missing the test skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from arq import create_pool

from db.engine import Database
from gateway.cli.embedded_redis import EmbeddedRedis, free_port
from jobs.protocol import redis_settings
from tests.certs import Certs
from tests.conftest import Databases, Stack, _backend_of, _redis_db, launch_stack
from tests.helpers import gateway_cmd, need, wait_until
from tests.postgres import Postgres
from tests.postgres import missing as postgres_missing
from tests.receiver import Receiver


def _postgres_only(database_url: str) -> None:
    if _backend_of(database_url) != "postgresql":
        pytest.skip("PostgreSQL's alone (the suite runs it under TEST_DATABASE_URL)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


# -- what every stack here does --------------------------------------------------


def _exercise(stack: Stack, receiver: Receiver, label: str) -> None:
    """Runs with a callback, a durable task's children, and a long-poll."""
    path = f"/{label}-{os.urandom(4).hex()}"
    with stack.client() as client:
        accepted = [
            client.post(
                "/api/v1/tasks/echo/trigger",
                json={"payload": {"n": n}, "options": {"callback_url": receiver.url(path)}},
            )
            for n in range(20)
        ]
        assert {a.status_code for a in accepted} == {202}
        ids = [a.json()["id"] for a in accepted]
        for run_id in ids:
            run = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
            assert run["status"] == "COMPLETED", run
    calls = receiver.wait_calls(path, 20, timeout=30)
    assert {c.json()["data"]["id"] for c in calls} == set(ids)
    items = [{"task": "echo", "payload": {"n": n}} for n in range(3)]
    then = {"task": "echo", "payload": {"then": True}}
    fanout = stack.run("tests.durable-fanout", {"items": items, "then": then})
    assert fanout["status"] == "COMPLETED", fanout["error"]
    assert [b["output"] for b in fanout["output"]["batch"]] == [{"n": n} for n in range(3)]


# -- PgBouncer ----------------------------------------------------------------------


class PgBouncer:
    """The distribution's pgbouncer in transaction pooling, in front of the
    suite's PostgreSQL, with ``pool`` server connections per database."""

    def __init__(self, server_url: str, pool: int) -> None:
        from sqlalchemy import make_url

        made = make_url(server_url)
        self.home = Path(tempfile.mkdtemp(prefix="gwt-bouncer-"))
        shutil.chown(self.home, "postgres")
        self.port = free_port()
        (self.home / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={made.host or '127.0.0.1'} port={made.port or 5432} user={made.username}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            "auth_type = any\npool_mode = transaction\n"
            f"default_pool_size = {pool}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            "max_client_conn = 1000\nunix_socket_dir =\n"
            f"logfile = {self.home}/pgbouncer.log\npidfile = {self.home}/pgbouncer.pid\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        self.user = made.username

    def start(self) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        result = subprocess.run(
            [binary, "-d", "-u", "postgres", str(self.home / "pgbouncer.ini")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: (self.home / "pgbouncer.pid").exists(), what="pgbouncer up")
        return self

    def url(self, database: str, *, flag: bool = True) -> str:
        query = "?pgbouncer=true" if flag else ""
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{database}{query}"

    def stop(self) -> None:
        pidfile = self.home / "pgbouncer.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        shutil.rmtree(self.home, ignore_errors=True)


def _pgbouncer_missing() -> str | None:
    if not (shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()):
        return "pgbouncer is not installed (the distribution's `pgbouncer` package)"
    return postgres_missing()  # the `postgres` user it runs as, and runuser


def _server_connections(databases: Databases, name: str) -> int:
    async def count() -> int:
        db = Database(databases.server_url)
        try:
            return int(
                await db.read(
                    lambda conn: conn.exec_driver_sql(
                        f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'"
                    ).scalar_one()
                )
            )
        finally:
            await db.dispose()

    return asyncio.run(count())


def test_pgbouncer_in_transaction_pooling_runs_the_whole_loop(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    _postgres_only(database_url)
    need(_pgbouncer_missing())
    from sqlalchemy import make_url

    name = make_url(databases.empty("bouncer")).database
    assert name
    bouncer = PgBouncer(databases.server_url, pool=3).start()
    try:
        # What `?pgbouncer=true` is for: a statement prepared in one
        # transaction is gone in the next, which PgBouncer may run on another
        # server connection; without it, a cached statement is not found.
        async def reads(url: str) -> list[Any]:
            db = Database(url)
            try:
                answers: list[Any] = []
                for _ in range(5):
                    answers += await asyncio.gather(
                        *(
                            db.read(lambda conn: conn.exec_driver_sql("SELECT 7").scalar_one())
                            for _ in range(20)
                        ),
                        return_exceptions=True,
                    )
                return answers
            finally:
                await db.dispose()

        plain = asyncio.run(reads(bouncer.url(name, flag=False)))
        failures = [str(r) for r in plain if isinstance(r, Exception)]
        assert any("prepared statement" in f for f in failures), plain[:5]
        assert asyncio.run(reads(bouncer.url(name))) == [7] * 100

        url = bouncer.url(name)
        migrated = gateway_cmd("migrate", env={**os.environ, "DATABASE_URL": url})
        assert migrated.returncode == 0, migrated.stderr
        with launch_stack(
            "bouncer",
            url,
            f"{redis_server.url}/{_redis_db(database_url, 17)}",
            tmp_path,
        ) as stack:
            _exercise(stack, receiver, "bouncer")
            # The gateway's pool holds more client connections than the
            # three server connections PgBouncer shares out among them.
            assert _server_connections(databases, name) <= 3
    finally:
        bouncer.stop()


# -- PostgreSQL over TLS -----------------------------------------------------------


def test_postgresql_with_sslmode_require_and_verify_full(
    database_url: str,
    redis_server: EmbeddedRedis,
    receiver: Receiver,
    certs: Certs,
    tmp_path: Path,
) -> None:
    _postgres_only(database_url)
    need(postgres_missing())
    server = Postgres()
    try:
        cert, key = certs.copy_to(server.home, "postgres")
        server.options += f" -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}"
        hba = server.data / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostnossl all all 127.0.0.1/32 reject\n"
        )
        server.start()
        plain = server.async_url + "?sslmode=disable"
        refused = gateway_cmd("migrate", env={**os.environ, "DATABASE_URL": plain})
        assert refused.returncode != 0 and "no encryption" in refused.stderr, refused.stderr
        required = server.async_url + "?sslmode=require"
        migrated = gateway_cmd("migrate", env={**os.environ, "DATABASE_URL": required})
        assert migrated.returncode == 0, migrated.stderr
        # verify-full: the server's certificate checked against our CA and its name.
        verified = server.async_url + f"?sslmode=verify-full&sslrootcert={certs.ca}"
        with launch_stack(
            "pg-tls",
            verified,
            f"{redis_server.url}/{_redis_db(database_url, 18)}",
            tmp_path,
        ) as stack:
            _exercise(stack, receiver, "pg-tls")
            over_tls = stack.query(
                "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s "
                "JOIN pg_stat_activity a USING (pid) WHERE a.datname = 'postgres' "
                "AND a.backend_type = 'client backend'"
            )
        count, all_tls = over_tls[0]
        assert count >= 1 and all_tls is True
    finally:
        server.close()


# -- Redis over TLS ------------------------------------------------------------------


def _tls_redis_missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "the distribution's redis-server (built with TLS) is not installed"
    return None


@pytest.fixture
def tls_redis(certs: Certs, tmp_path: Path) -> Iterator[int]:
    need(_tls_redis_missing())
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary
    log = open(tmp_path / "redis.log", "wb")
    process = subprocess.Popen(
        [
            binary,
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs.cert),
            "--tls-key-file", str(certs.key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "no",
            "--save", "",
            "--appendonly", "no",
            "--databases", "4",
            "--dir", str(tmp_path),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}"

        async def ping() -> bool:
            try:
                pool = await create_pool(redis_settings(url))
            except Exception:
                return False
            await pool.aclose()
            return True

        def up() -> bool:
            if process.poll() is not None:
                said = (tmp_path / "redis.log").read_text()
                need(f"this redis-server does not serve TLS: {said[-300:]}")
            return asyncio.run(ping())

        wait_until(up, what="TLS Redis up")
        yield port
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_redis_over_tls(
    databases: Databases,
    database_url: str,
    tls_redis: int,
    receiver: Receiver,
    certs: Certs,
    tmp_path: Path,
) -> None:
    port = tls_redis

    # Our CA is needed: without it the server's certificate is not trusted.
    async def connect(url: str) -> str:
        try:
            pool = await create_pool(redis_settings(url))
        except Exception as exc:
            return type(exc).__name__ + ": " + str(exc)
        await pool.aclose()
        return "ok"

    untrusted = asyncio.run(connect(f"rediss://127.0.0.1:{port}/1"))
    assert "certificate verify failed" in untrusted, untrusted
    assert asyncio.run(connect(f"rediss://127.0.0.1:{port}/1?ssl_ca_certs={certs.ca}")) == "ok"
    with launch_stack(
        "redis-tls",
        databases.new("redistls"),
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}",
        tmp_path,
    ) as stack:
        _exercise(stack, receiver, "redis-tls")
        with stack.client() as client:
            ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
