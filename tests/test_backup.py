"""``gateway backup`` while runs flow, and ``gateway restore`` into a fresh
gateway: every run final before the backup is there with its output and its
artifact's bytes, the runs in flight at the backup finish after the restore
(the reconciler queues them again: Redis is not in a backup), and what came
after the backup is not there. On SQLite (the online backup API, artifacts as
files) and PostgreSQL (pg_dump, artifacts in the database).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli.embedded_redis import EmbeddedRedis
from tests.conftest import Databases, Stack, _redis_db, launch_stack
from tests.helpers import gateway_cmd, wait_until
from tests.test_tasks import data_uri, download, quadrants

FINAL = ("COMPLETED", "FAILED", "CANCELED", "EXPIRED", "TIMED_OUT")


@pytest.fixture
def source(
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    with launch_stack(
        "backup",
        databases.new("backup"),
        f"{redis_server.url}/{_redis_db(database_url, 15)}",
        tmp_path_factory.mktemp("logs-backup"),
    ) as stack:
        yield stack


class Crops:
    """Crop runs triggered one after another until stopped, each with an artifact."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.run_ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with self.stack.client() as client:
            n = 0
            while not self._stop.is_set():
                payload = {
                    "image": data_uri(quadrants()),
                    "x": n % 50,
                    "y": 0,
                    "width": 20,
                    "height": 20,
                }
                answer = client.post("/api/v1/tasks/crop-image/trigger", json={"payload": payload})
                assert answer.status_code == 202, answer.text
                self.run_ids.append(answer.json()["id"])
                n += 1
                self._stop.wait(0.02)

    def __enter__(self) -> Crops:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _final_runs(stack: Stack) -> set[str]:
    rows = stack.query(
        "SELECT id FROM runs WHERE project_id = :p AND status IN "
        "('COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')",
        p=stack.project_id,
    )
    return {row[0] for row in rows}


def test_a_backup_taken_while_runs_flow_restores_into_a_fresh_gateway(
    source: Stack,
    databases: Databases,
    database_url: str,
    redis_server: EmbeddedRedis,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "backup"
    with Crops(source) as crops:
        wait_until(lambda: len(_final_runs(source)) >= 10, what="ten crops done")
        final_before = _final_runs(source)
        made = gateway_cmd("backup", str(folder), env=source.env)
        assert made.returncode == 0, made.stderr
        wait_until(lambda: len(crops.run_ids) > len(final_before) + 20, what="runs after it")
    manifest = json.loads(made.stdout)
    assert manifest["database"] == ("sqlite" if database_url.startswith("sqlite") else "postgresql")
    assert manifest["revision"]
    if manifest["artifact_store"] == "local":
        assert manifest["artifact_files"] >= len(final_before)
    # Into a folder that is not empty: refused, nothing written.
    again = gateway_cmd("backup", str(folder), env=source.env)
    assert again.returncode == 2 and "not empty" in again.stderr

    restored_url = databases.empty("restored")
    target = {
        **source.env,
        "DATABASE_URL": restored_url,
        "ARTIFACT_DIR": str(tmp_path / "restored-artifacts"),
    }
    put_back = gateway_cmd("restore", str(folder), env=target)
    assert put_back.returncode == 0, put_back.stderr
    refused = gateway_cmd("restore", str(folder), env=target)
    assert refused.returncode == 2 and "--force" in refused.stderr

    (tmp_path / "logs").mkdir()
    outputs: dict[str, Any] = {}
    with source.client() as client:
        for run_id in final_before:
            outputs[run_id] = client.get(f"/api/v1/runs/{run_id}").json()

    with (
        launch_stack(
            "restored",
            restored_url,
            f"{redis_server.url}/{_redis_db(database_url, 16)}",
            tmp_path / "logs",
            ARTIFACT_DIR=target["ARTIFACT_DIR"],
        ) as restored,
        httpx.Client(
            base_url=restored.base_url,
            headers={"authorization": f"Bearer {source.api_key}"},  # the key is in the backup
            timeout=40,
        ) as client,
    ):
        for run_id, before in outputs.items():
            run = client.get(f"/api/v1/runs/{run_id}").json()
            assert (run["status"], run["output"]) == (before["status"], before["output"])
            if run["status"] == "COMPLETED":
                link = client.get(f"/api/v1/artifacts/{run['output']['artifact_id']}/link")
                assert link.status_code == 200, link.text
                got = download(link.json()["url"])
                assert got.status_code == 200
                assert hashlib.sha256(got.content).hexdigest() == run["output"]["sha256"]
        in_backup = [
            run_id
            for run_id in crops.run_ids
            if client.get(f"/api/v1/runs/{run_id}").status_code == 200
        ]
        assert set(final_before) <= set(in_backup)
        assert len(in_backup) < len(crops.run_ids)  # what came after is not there
        # Runs in flight at the backup run again and finish.
        for run_id in set(in_backup) - final_before:
            run = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
            assert run["status"] == "COMPLETED", run
