"""schemathesis against /openapi.json: no 5xx and no answer outside the schema.

The gateway under test has no worker, so nothing it accepts is ever executed
or called back: generated URLs never leave this machine.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from gateway.cli.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import TEST_SECRET, Databases, _redis_db
from tests.helpers import ROOT, Process, child_env, wait_http_ok


@pytest.fixture(scope="module")
def lone_gateway(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """A gateway with a database of its own and no worker; its URL and a key."""
    from gateway.auth.keys import _create_api_key, generate_api_key
    from tests.helpers import db_call

    own_database = databases.new("fuzz")
    key = generate_api_key()
    db_call(own_database, lambda conn: _create_api_key(conn, "fuzz", key), write=True)
    port = free_port()
    env = child_env(
        DATABASE_URL=own_database,
        PORT=str(port),
        GATEWAY_SECRET_KEY=TEST_SECRET,
        REDIS_URL=f"{redis_server.url}/{_redis_db(database_url, 3)}",
        TASK_MODULES="tests.tasks",
        LOG_LEVEL="WARNING",
    )
    gateway = Process(
        "gateway-fuzz", ["-m", "gateway", "web"], env, tmp_path_factory.mktemp("logs-fuzz")
    ).start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", gateway)
        yield f"http://127.0.0.1:{port}", key
    finally:
        gateway.stop()


def test_schemathesis_finds_no_server_error_and_no_schema_break(
    lone_gateway: tuple[str, str],
) -> None:
    base_url, key = lone_gateway
    binary = shutil.which("schemathesis", path=str(ROOT / ".venv" / "bin")) or "schemathesis"
    result = subprocess.run(
        [
            binary,
            "run",
            f"{base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {key}",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "15",
            "--request-timeout",
            "10",
            "--seed",
            "1",
            # An event stream stays open while its run is not final, and here
            # no run ever is.
            "--exclude-path",
            "/api/v1/runs/{run_id}/events",
            # Each task's own trigger operation is the generic one's handler
            # with a typed body: the generic one and crop-image's stand for
            # all of them.
            "--exclude-path-regex",
            r"^/api/v1/tasks/(?!crop-image/)[^{/]+/trigger$",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**child_env(), "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Tested" in result.stdout
