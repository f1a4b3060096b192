"""A task's log lines, kept with its run: through the API, the event stream,
a cap, and an unplanned exception's traceback; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import Stack
from tests.helpers import dashboard_session


def _run(stack: Stack, payload: Any, **options: Any) -> dict[str, Any]:
    return stack.run("tests.logs", payload, **options)


def _lines(stack: Stack, run_id: str, **params: Any) -> dict[str, Any]:
    with stack.client() as client:
        answer = client.get(f"/api/v1/runs/{run_id}/logs", params=params)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_a_tasks_lines_come_back_in_order_with_their_fields(stack: Stack) -> None:
    run = _run(stack, {"lines": 5})
    assert run["status"] == "COMPLETED"
    page = _lines(stack, run["id"])
    lines = page["data"]
    assert [line["level"] for line in lines] == ["DEBUG", *["INFO"] * 5, "WARNING"]
    assert lines[0]["message"] == "starting with {'lines': 5}"
    assert [line["message"] for line in lines[1:6]] == [f"line {n} of attempt 1" for n in range(5)]
    assert [line["fields"] for line in lines[1:6]] == [{"n": n, "who": "tests"} for n in range(5)]
    assert {line["attempt"] for line in lines} == {1}
    times = [line["ts"] for line in lines]
    assert times == sorted(times)
    assert page["next_cursor"] is None
    # Pages follow each other with no line twice.
    first = _lines(stack, run["id"], limit=3)
    second = _lines(stack, run["id"], limit=3, cursor=first["next_cursor"])
    third = _lines(stack, run["id"], limit=3, cursor=second["next_cursor"])
    assert [x["id"] for x in first["data"] + second["data"] + third["data"]] == [
        x["id"] for x in lines
    ]


def test_an_unplanned_exception_leaves_its_traceback_in_every_attempts_log(stack: Stack) -> None:
    run = _run(stack, {"lines": 1, "raise": True}, max_attempts=2, retry={"min_delay": 0.05})
    assert run["status"] == "FAILED" and run["error"]["code"] == "task_exception"
    lines = _lines(stack, run["id"])["data"]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert [line["attempt"] for line in errors] == [1, 2]
    assert all("RuntimeError: the task gave up" in line["message"] for line in errors)
    assert all("Traceback (most recent call last)" in line["message"] for line in errors)
    assert errors[0]["fields"] == {"exception": "RuntimeError"}
    # Each attempt's lines come before the next attempt's.
    assert [line["attempt"] for line in lines] == sorted(line["attempt"] for line in lines)


def test_a_run_keeps_at_most_its_cap_and_says_how_many_it_dropped(stack: Stack) -> None:
    run = _run(stack, {"lines": 300})  # 302 lines; the tests' stack keeps 150
    assert run["status"] == "COMPLETED"
    lines = _lines(stack, run["id"], limit=1000)["data"]
    assert len(lines) == 151
    assert lines[-1]["fields"] == {"dropped": 152}
    assert "152 more log line(s) dropped" in lines[-1]["message"]
    assert "RUN_LOG_MAX_LINES" in lines[-1]["message"]


def test_the_event_stream_sends_each_line_before_the_final_status(stack: Stack) -> None:
    with stack.client() as client:
        started = client.post(
            "/api/v1/tasks/tests.logs/trigger", json={"payload": {"lines": 4}}
        ).json()
        events: list[tuple[str, Any]] = []
        with client.stream("GET", f"/api/v1/runs/{started['id']}/events") as stream:
            kind = None
            for raw in stream.iter_lines():
                if raw.startswith("event: "):
                    kind = raw[len("event: ") :]
                elif raw.startswith("data: ") and kind:
                    events.append((kind, json.loads(raw[len("data: ") :])))
    logs = [data["message"] for kind, data in events if kind == "log"]
    assert logs[1:5] == [f"line {n} of attempt 1" for n in range(4)] and len(logs) == 6
    assert events[-1][0] == "status" and events[-1][1]["status"] == "COMPLETED"
    last_log = max(i for i, (kind, _) in enumerate(events) if kind == "log")
    assert last_log < len(events) - 1


def test_logs_are_the_runs_own_to_read(stack: Stack) -> None:
    run = _run(stack, {"lines": 1})
    with stack.client(stack.new_key("logs-other")) as other:
        assert other.get(f"/api/v1/runs/{run['id']}/logs").status_code == 404
    with stack.client() as client:
        token = client.post(
            "/api/v1/tasks/tests.logs/trigger", json={"payload": {"lines": 1}}
        ).json()
        client.get(f"/api/v1/runs/{token['id']}", params={"wait": 20})
        assert client.get(f"/api/v1/runs/{run['id']}/logs", params={"limit": 0}).status_code == 422
        assert (
            client.get(f"/api/v1/runs/{run['id']}/logs", params={"cursor": "x"}).status_code == 400
        )
    public = httpx.get(
        f"{stack.base_url}/api/v1/runs/{token['id']}/logs",
        params={"token": token["public_access_token"]},
    )
    assert public.status_code == 200 and len(public.json()["data"]) == 3
    wrong = httpx.get(
        f"{stack.base_url}/api/v1/runs/{run['id']}/logs",
        params={"token": token["public_access_token"]},
    )
    assert wrong.status_code == 404


def test_a_plain_def_task_logs_from_its_thread(stack: Stack) -> None:
    run = stack.run("tests.thread-logs", {})
    assert run["status"] == "COMPLETED", run["error"]
    [line] = _lines(stack, run["id"])["data"]
    assert line["message"] == "from a thread"
    assert line["fields"] == {"thread": run["output"]["thread"]}


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_log_flood_is_capped_in_the_worker_and_counted(stack: Stack) -> None:
    """Past RUN_LOG_MAX_LINES (150 here) a worker ships nothing more and keeps
    nothing more: its memory stays flat, and the run says how many it left out."""
    assert stack.worker.popen is not None
    pid = stack.worker.popen.pid
    for task, lines in (("tests.log-flood", 30_000), ("tests.log-flood-thread", 20_000)):
        before = _peak_rss_mb(pid)
        run = _run_task(stack, task, {"lines": lines, "size": 4096})
        assert run["status"] == "COMPLETED", run
        kept = _lines(stack, run["id"], limit=1000)["data"]
        assert len(kept) == 151, len(kept)
        assert kept[-1]["fields"] == {"dropped": lines - 150}, kept[-1]
        # 120 MB (80 MB) of lines went through the logger; the worker's
        # peak grew by a small part of that at most.
        assert _peak_rss_mb(pid) - before < 40, (before, _peak_rss_mb(pid))


def test_lines_with_a_large_extra_are_cut_to_fit_and_all_arrive(stack: Stack) -> None:
    """A batch of lines each with 50 KB of ``extra`` would be over the
    gateway's body limit: each line's fields are cut, batches are sized to fit."""
    run = _run_task(stack, "tests.log-flood", {"lines": 120, "size": 10, "extra": 50_000})
    assert run["status"] == "COMPLETED", run
    kept = _lines(stack, run["id"], limit=1000)["data"]
    assert len(kept) == 120
    assert [line["fields"]["n"] for line in kept] == list(range(120))
    blob = kept[0]["fields"]["blob"]
    assert blob.endswith("…") and len(blob) < 4096


def _run_task(stack: Stack, task: str, payload: Any) -> dict[str, Any]:
    return stack.run(task, payload)


def test_control_sequences_in_log_lines_are_shown_escaped(stack: Stack) -> None:
    """``gateway runs logs`` and the dashboard show a task's escape sequences
    as text, never as what a terminal would obey; the fields come along."""
    from tests.test_client import cli

    run = _run_task(stack, "tests.log-escapes", None)
    assert run["status"] == "COMPLETED"
    printed = cli(stack, "runs", "logs", run["id"], key=stack.api_key)
    assert printed.returncode == 0, printed.stderr
    assert "\x1b" not in printed.stdout and "\x07" not in printed.stdout
    assert "\u202e" not in printed.stdout
    assert "\\x1b]0;pwned\\x07title \\x1b[2J\\x1b[Hcleared" in printed.stdout
    assert "\\u202eesrever" in printed.stdout
    assert 'who="tests"' in printed.stdout
    # Stored as it came: the API gives back what the task wrote.
    assert "\x1b[2J" in _lines(stack, run["id"])["data"][0]["message"]
    dash = dashboard_session(stack.base_url, stack.api_key)
    try:
        page = dash.get(f"/dashboard/runs/{run['id']}")
    finally:
        dash.close()
    assert page.status_code == 200
    assert "\x1b" not in page.text and "\u202e" not in page.text
    assert "\\x1b]0;pwned" in page.text and "\\u202eesrever" in page.text


def test_printable_escapes_controls_and_keeps_line_breaks() -> None:
    from gateway.client.text import printable

    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable("\x1b[31mred\x1b[0m\r\x7f") == "\\x1b[31mred\\x1b[0m\\x0d\\x7f"
    assert printable("\u2028x\u200b") == "\\u2028x\\u200b"
    assert printable("ünïcødé ✓") == "ünïcødé ✓"
