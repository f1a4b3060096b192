"""Running the gateway as a user deploys it: the installed ``gateway`` command
from the user's own folder, a database nobody migrated, managing keys, and
the client command's errors (each a trap a user fell into)."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from db.migrate import upgrade
from gateway.cli.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import TEST_SECRET, Databases, Stack, _admin, _redis_db
from tests.helpers import ROOT, Process, child_env, wait_http_ok, wait_until

#: The console script a user runs (not ``python -m gateway``, which puts the
#: working folder on the import path by itself).
GATEWAY = str(Path(sys.executable).parent / "gateway")


def readme_tasks() -> str:
    """The task module the README shows under "Writing tasks", as it is."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing tasks") :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "no python block under 'Writing tasks'"
    docs = (ROOT / "docs" / "tasks.md").read_text()
    assert found.group(1) in docs, "docs/tasks.md shows another task module than the README"
    return found.group(1)


def png_data_uri(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def gateway(
    *args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GATEWAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def one_line(stderr: str) -> str:
    """The error, which must be a single line and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


class Scripts(Process):
    """A ``gateway`` command run as the console script, from a folder of ours."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        super().__init__(name, args, env, cwd)
        self.cwd = cwd

    def start(self) -> Scripts:
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [GATEWAY, *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self


@pytest.fixture
def app_env(
    databases: Databases, database_url: str, redis_server: EmbeddedRedis, tmp_path: Path
) -> dict[str, str]:
    """The environment of an app's own deployment: a fresh database, a Redis
    database of its own, nothing of the tests' on the import path."""
    port = free_port()
    env = child_env(
        DATABASE_URL=databases.new("operate"),
        REDIS_URL=f"{redis_server.url}/{_redis_db(database_url, 7)}",
        GATEWAY_SECRET_KEY=TEST_SECRET,
        PORT=str(port),
        GATEWAY_URL=f"http://127.0.0.1:{port}",
        DATA_DIR=str(tmp_path / "data"),
    )
    env["PYTHONPATH"] = ""
    return env


# -- own tasks beside the Procfile ------------------------------------------------


def test_own_tasks_import_from_the_folder_the_command_runs_in(
    app_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "my-app"
    folder.mkdir()
    (folder / "my_tasks.py").write_text(readme_tasks())
    env = {**app_env, "TASK_MODULES": "my_tasks"}
    web = Scripts("web", ["web"], env, folder).start()
    worker = Scripts("worker", ["worker"], env, folder).start()
    try:
        base = env["GATEWAY_URL"]
        wait_http_ok(base + "/healthz", web)
        created = gateway("keys", "create", "my-app", env=env, cwd=folder)
        key = created.stdout.split()[-1]
        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}) as client:
            too_wide = client.post(
                "/api/v1/tasks/thumbnail/trigger", json={"payload": {"width": 64}}
            )
            assert too_wide.status_code == 422  # the payload model, checked by the gateway
            accepted = client.post(
                "/api/v1/tasks/thumbnail/trigger",
                json={"payload": {"image": png_data_uri(300, 200), "width": 64}},
            )
            assert accepted.status_code == 202, accepted.text
            run = client.get(accepted.headers["location"], params={"wait": 30}, timeout=40).json()
            assert run["status"] == "COMPLETED", (run, worker.log_tail())
            stored = run["output"]["artifact"]
            assert (stored["width"], stored["height"]) == (64, 43)
            image = client.get(stored["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (64, 43)
        assert f"attempt 1 of run {run['id']}" in worker.log_path.read_text()
    finally:
        web.stop()
        worker.stop()


def test_a_task_module_that_is_not_there_is_one_line(
    app_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**app_env, "TASK_MODULES": "my_tasks"}
    for command in ("worker", "web"):
        result = gateway(command, env=env, cwd=tmp_path)
        assert result.returncode == 2
        line = one_line(result.stderr)
        assert "TASK_MODULES" in line and "'my_tasks'" in line and "PYTHONPATH" in line


# -- a database nobody migrated ---------------------------------------------------


def test_web_refuses_a_database_behind_its_code_and_says_to_migrate(
    databases: Databases, app_env: dict[str, str]
) -> None:
    url = databases.empty("unmigrated")
    env = {**app_env, "DATABASE_URL": url}
    empty = gateway("web", env=env)
    assert empty.returncode == 2
    line = one_line(empty.stderr)
    assert "no schema" in line and "gateway migrate" in line and "MIGRATE_ON_START" in line

    upgrade(url, "0006")
    behind = gateway("web", env=env)
    assert behind.returncode == 2
    line = one_line(behind.stderr)
    assert "revision 0006" in line and "gateway migrate" in line


def test_a_database_unmigrated_when_it_first_answers_gets_503_until_migrated(
    databases: Databases, app_env: dict[str, str], tmp_path: Path
) -> None:
    """Started before its database existed: the gateway serves, and says
    what is wrong once the database answers, until it is migrated."""
    if databases.backend != "postgresql":
        pytest.skip("a SQLite file is there as soon as it is opened")
    url = databases.empty("late")
    name = url.rsplit("/", 1)[-1]
    asyncio.run(_admin(databases.server_url, f'DROP DATABASE "{name}"'))
    env = {**app_env, "DATABASE_URL": url}
    web = Process("web", ["-m", "gateway", "web"], env, tmp_path).start()
    base = env["GATEWAY_URL"]
    try:
        wait_http_ok(base + "/healthz", web)
        assert httpx.get(base + "/readyz").json()["error"]["details"][0]["check"] == "database"
        asyncio.run(_admin(databases.server_url, f'CREATE DATABASE "{name}"'))

        def not_migrated() -> httpx.Response | None:
            answer = httpx.get(base + "/api/v1/runs", headers={"authorization": "Bearer gw_sk_x"})
            code = answer.json()["error"]["code"] if answer.status_code == 503 else ""
            return answer if code == "database_not_migrated" else None

        answer = wait_until(not_migrated, what="the API to say the database needs migrating")
        assert "gateway migrate" in answer.json()["error"]["message"]
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 503
        assert {d["check"] for d in ready.json()["error"]["details"]} == {"schema"}

        assert gateway("migrate", env=env).returncode == 0
        key = gateway("keys", "create", "late", env=env).stdout.split()[-1]
        wait_until(
            lambda: httpx.get(base + "/readyz").status_code == 200, what="the gateway to be ready"
        )
        runs = httpx.get(base + "/api/v1/runs", headers={"authorization": f"Bearer {key}"})
        assert runs.status_code == 200, runs.text
    finally:
        web.stop()
    assert "does not answer yet" in web.log_path.read_text()


def test_migrate_on_start_migrates_then_serves(
    databases: Databases, app_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**app_env, "DATABASE_URL": databases.empty("on-start"), "MIGRATE_ON_START": "1"}
    web = Process("web", ["-m", "gateway", "web"], env, tmp_path).start()
    try:
        wait_http_ok(env["GATEWAY_URL"] + "/readyz", web)
        key = gateway("keys", "create", "on-start", env=env).stdout.split()[-1]
        answer = httpx.post(
            env["GATEWAY_URL"] + "/api/v1/tasks/echo/trigger",
            json={"payload": 1},
            headers={"authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 202, answer.text
    finally:
        web.stop()


def test_gateways_that_migrate_at_once_take_turns(
    databases: Databases, app_env: dict[str, str]
) -> None:
    if databases.backend != "postgresql":
        pytest.skip("SQLite has one writer: two migrations cannot overlap")
    env = {**app_env, "DATABASE_URL": databases.empty("together")}
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(gateway("migrate", env=env)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr[-800:] for r in results]


# -- keys ---------------------------------------------------------------------------


def signed_in_dashboard(base_url: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=base_url, follow_redirects=False)
    page = client.get("/dashboard/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf, page.text[:500]
    answer = client.post(
        "/dashboard/login", data={"csrf_token": csrf.group(1), "api_key": key, "next": ""}
    )
    assert answer.status_code == 303, answer.text[:500]
    assert client.get("/dashboard/runs").status_code == 200
    return client


def test_keys_list_rotate_and_revoke_take_effect_everywhere(stack: Stack) -> None:
    keys_env = stack.env
    project = f"keys-{free_port()}"
    created = gateway("keys", "create", project, env=keys_env)
    first = created.stdout.split()[-1]

    def status(key: str) -> int:
        answer = httpx.get(
            stack.base_url + "/api/v1/runs", headers={"authorization": f"Bearer {key}"}
        )
        return answer.status_code

    listed = gateway("keys", "list", "--project", project, env=keys_env)
    assert listed.returncode == 0, listed.stderr
    [row] = listed.stdout.splitlines()
    first_id = row.split()[0]
    assert first_id.startswith("key_") and first[:12] in row and row.endswith("active")
    assert status(first) == 200
    dashboard = signed_in_dashboard(stack.base_url, first)

    # Rotate with a grace: both keys work until the old one's time comes.
    rotated = gateway("keys", "rotate", first_id, "--grace", "1h", env=keys_env)
    assert rotated.returncode == 0, rotated.stderr
    second = rotated.stdout.split()[-1]
    assert second.startswith("gw_sk_") and second != first
    assert status(first) == 200 and status(second) == 200
    rows = gateway("keys", "list", "--project", project, env=keys_env).stdout.splitlines()
    assert len(rows) == 2 and "active until" in rows[0] and rows[1].endswith("active")

    # Revoked now: refused by the API and the dashboard, the other key goes on.
    revoked = gateway("keys", "revoke", first_id, env=keys_env)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    wait_until(lambda: status(first) == 401, timeout=5, what="the revoked key to be refused")
    assert dashboard.get("/dashboard/runs").status_code in (302, 303)
    dashboard.close()
    assert status(second) == 200
    # Revoked by the key itself (what a user who leaked it holds).
    assert gateway("keys", "revoke", second, env=keys_env).returncode == 0
    wait_until(lambda: status(second) == 401, timeout=5, what="the second key to be refused")
    assert "revoked" in gateway("keys", "list", "--project", project, env=keys_env).stdout

    unknown = gateway("keys", "revoke", "key_nope", env=keys_env)
    assert unknown.returncode == 1 and "no such key" in one_line(unknown.stderr)
    again = gateway("keys", "rotate", first_id, env=keys_env)
    assert again.returncode == 1 and "revoked already" in one_line(again.stderr)


# -- the client command's errors ---------------------------------------------------


def test_client_command_errors_are_one_line(stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if k not in ("GATEWAY_URL", "GATEWAY_API_KEY")}
    env["PYTHONPATH"] = ""

    no_key = gateway("runs", "list", env={**env, "GATEWAY_API_KEY": ""})
    assert no_key.returncode == 1
    assert "GATEWAY_API_KEY is not set" in one_line(no_key.stderr)

    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = gateway(
        "trigger", "echo", env={**env, "GATEWAY_URL": nobody, "GATEWAY_API_KEY": stack.api_key}
    )
    assert unreachable.returncode == 1
    assert f"cannot reach the gateway at {nobody}" in one_line(unreachable.stderr)

    nonsense = gateway(
        "runs", "list", env={**env, "GATEWAY_URL": "gateway:eighty", "GATEWAY_API_KEY": "k"}
    )
    assert nonsense.returncode == 1 and "cannot reach" in one_line(nonsense.stderr)

    # No GATEWAY_URL: the client goes where a server with this PORT listens.
    listed = gateway("runs", "list", "--limit", "1", env={**env, "GATEWAY_API_KEY": stack.api_key})
    assert listed.returncode == 0, listed.stderr
