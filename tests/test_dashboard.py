"""The dashboard, in a real headless Chromium against the real gateway and worker.

Every test signs in to a project of its own, so what a page shows is exactly
what that test made. Screenshots of the main pages land under
``test-artifacts/dashboard/<backend>/``.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.browser import ARTIFACTS, LAUNCH_ARGS, Dashboard, chromium_path
from tests.conftest import Stack
from tests.gemini import GeminiStandIn
from tests.receiver import Receiver
from tests.test_tasks import data_uri, quadrants
from tests.test_workflows import edge


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium on this CI machine: .ci/run installs Debian's `chromium`")
        pytest.skip("no Chromium here: install Debian's `chromium`, or set CHROMIUM_PATH")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=LAUNCH_ARGS)
        yield launched
        launched.close()


def backend(stack: Stack) -> str:
    return "sqlite" if stack.database_url.startswith("sqlite") else "postgresql"


@pytest.fixture
def dashboards(browser: Browser, stack: Stack) -> Iterator[Any]:
    """Makes browser contexts (each its own cookies) and checks no page logged a
    script error."""
    made: list[Dashboard] = []

    def make(**options: Any) -> Dashboard:
        dashboard = Dashboard(browser, stack.base_url, shots=ARTIFACTS / backend(stack), **options)
        made.append(dashboard)
        return dashboard

    yield make
    for dashboard in made:
        dashboard.close()
    # A page answered with 4xx on purpose is logged by the browser; not a script error.
    errors = [e for d in made for e in d.errors if not e.startswith("Failed to load resource")]
    assert not errors, errors


def project(stack: Stack, name: str) -> str:
    """A new project's API key."""
    return stack.new_key(f"dash-{name}-{secrets.token_hex(3)}")


def trigger(stack: Stack, key: str, task: str, payload: Any = None, **options: Any) -> str:
    with stack.client(key) as client:
        answer = client.post(
            f"/api/v1/tasks/{task}/trigger", json={"payload": payload, "options": options}
        )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def final(stack: Stack, key: str, run_id: str) -> dict[str, Any]:
    with stack.client(key) as client:
        run = client.get(f"/api/v1/runs/{run_id}", params={"wait": 30}).json()
    assert run["is_final"], run
    return dict(run)


# -- sign-in and the session -----------------------------------------------------


def test_sign_in_keeps_a_strict_http_only_session_and_sign_out_ends_it(
    stack: Stack, dashboards: Any
) -> None:
    key = project(stack, "signin")
    dash = dashboards()
    page = dash.open("/runs")
    assert "/dashboard/login" in page.url  # not signed in: sent to sign in first
    dash.screenshot("login")

    page.fill("input[name=api_key]", "gw_sk_not-a-key")
    page.click("form[action$='/login'] button[type=submit]")
    expect(page.locator(".flash.error")).to_contain_text("not valid")
    assert "session" not in str(dash.cookies().get("gateway_dashboard", {}).get("value", ""))

    dash.sign_in(key)
    cookie = dash.cookies()["gateway_dashboard"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard"
    assert key not in cookie["value"]  # the key itself is never stored
    expect(page.locator(".who .project")).to_contain_text("dash-signin-")

    def with_cookie(value: str) -> httpx.Response:
        jar = httpx.Cookies({"gateway_dashboard": value})
        return httpx.get(stack.base_url + "/dashboard/runs", cookies=jar, follow_redirects=False)

    copied = cookie["value"]
    assert with_cookie(copied).status_code == 200  # a copy of the cookie works while signed in

    dash.submit(".who button[type=submit]")
    assert page.url.endswith("/dashboard/login")
    dash.open("/runs")
    assert "/dashboard/login" in page.url
    # Signing out ended the session on the server: the copy opens nothing now.
    answer = with_cookie(copied)
    assert answer.status_code in (302, 303), answer.status_code
    assert "/dashboard/login" in answer.headers["location"]


def test_a_form_without_the_csrf_token_changes_nothing(stack: Stack, dashboards: Any) -> None:
    key = project(stack, "csrf")
    run_id = trigger(stack, key, "sleep", {"seconds": 30})
    dash = dashboards()
    dash.sign_in(key)
    with dash.http() as http:
        forged = http.post(f"/dashboard/runs/{run_id}/cancel", data={"csrf_token": "forged"})
        missing = http.post(f"/dashboard/runs/{run_id}/cancel")
    assert forged.status_code == missing.status_code == 403
    assert "csrf" in forged.text.lower() or "stale" in forged.text
    with stack.client(key) as client:
        assert client.get(f"/api/v1/runs/{run_id}").json()["status"] != "CANCELED"
        assert client.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200


def test_pages_send_a_strict_content_security_policy(stack: Stack, dashboards: Any) -> None:
    dash = dashboards()
    dash.sign_in(project(stack, "headers"))
    with dash.http() as http:
        page = http.get("/dashboard/runs")
        script = http.get("/dashboard/static/dashboard.js")
        stream = http.get("/dashboard/stream", params={"run": "run_nope"})
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert script.status_code == 200 and "EventSource" in script.text
    assert stream.status_code == 404 and stream.json()["error"]["code"] == "run_not_found"
    # A cursor that is not one (or would overflow a BIGINT) means "from now".
    for after in ("9" * 40, "².1", "x"):
        with (
            dash.http() as http,
            http.stream("GET", "/dashboard/stream", params={"after": after}) as feed,
        ):
            assert feed.status_code == 200
            assert next(feed.iter_text()).startswith("retry:")
    with dash.http() as http:
        nope = http.post("/dashboard/endpoints/ep_x/explode", data={"csrf_token": "x"})
    assert nope.status_code == 404 and "no endpoint action" in nope.text
    # Without a session: JSON for the live feed, a sign-in page for the rest.
    assert httpx.get(stack.base_url + "/dashboard/stream").status_code == 401
    answer = httpx.get(stack.base_url + "/dashboard/runs/run_x")
    assert answer.status_code == 303 and "/dashboard/login?next=" in answer.headers["location"]


# -- runs, live --------------------------------------------------------------------


def test_a_new_run_appears_and_turns_completed_without_a_reload(
    stack: Stack, dashboards: Any
) -> None:
    key = project(stack, "live")
    dash = dashboards()
    page = dash.sign_in(key)
    dash.wait_live()
    page.evaluate("window.notReloaded = true")
    expect(page.locator("[data-count=COMPLETED] b")).to_have_text("0")

    run_id = trigger(stack, key, "sleep", {"seconds": 3}, tags=["live-test"])
    row = page.locator(f"tr[data-run-id='{run_id}']")
    expect(row).to_be_visible()
    first_seen = row.get_attribute("data-status")
    expect(row).to_have_attribute("data-status", "COMPLETED", timeout=30_000)
    expect(row.locator(".badge")).to_have_text("COMPLETED")
    expect(page.locator("[data-count=COMPLETED] b")).to_have_text("1")
    assert first_seen in ("QUEUED", "EXECUTING"), first_seen
    assert page.evaluate("window.notReloaded") is True
    expect(row).to_contain_text("live-test")
    expect(row).to_contain_text(re.compile(r"\d(\.\d)? s"))  # its duration


def test_filters_and_cursor_pages(stack: Stack, dashboards: Any) -> None:
    key = project(stack, "filters")
    echoes = [trigger(stack, key, "echo", {"i": i}, tags=["blue"]) for i in range(27)]
    failed = trigger(stack, key, "tests.fail", {"code": "boom"}, tags=["red"])
    for run_id in [*echoes, failed]:
        final(stack, key, run_id)
    dash = dashboards()
    page = dash.sign_in(key)

    rows = page.locator("table.runs tbody tr[data-run-id]")
    expect(rows).to_have_count(25)
    assert rows.first.get_attribute("data-run-id") == failed  # newest first
    expect(page.locator("[data-count=FAILED] b")).to_have_text("1")
    expect(page.locator("[data-count=COMPLETED] b")).to_have_text("27")

    with page.expect_navigation():
        page.click(".pager a:has-text('Older')")
    expect(rows).to_have_count(3)
    assert {r.get_attribute("data-run-id") for r in rows.all()} == set(echoes[:3])

    with page.expect_navigation():
        page.select_option("select[name=status]", "FAILED")  # submits itself
    expect(rows).to_have_count(1)
    assert rows.first.get_attribute("data-run-id") == failed

    dash.open("/runs?tag=blue&task=echo")
    expect(rows).to_have_count(25)
    dash.open("/runs?status=NOPE")
    expect(page.locator(".flash.error")).to_contain_text("no status 'NOPE'")


# -- one run -------------------------------------------------------------------------


def test_cancel_a_running_sleep_from_its_page(stack: Stack, dashboards: Any) -> None:
    key = project(stack, "cancel")
    run_id = trigger(stack, key, "sleep", {"seconds": 60})
    dash = dashboards()
    dash.sign_in(key)
    page = dash.open(f"/runs/{run_id}")
    dash.wait_live()
    expect(page.locator("#run-status .badge")).to_have_text("EXECUTING")  # live, no reload
    expect(page.locator("[data-since]").first).to_contain_text("running")

    dash.submit("button[data-action=cancel]", confirm=True)
    expect(page.locator("#run-status .badge")).to_have_text("CANCELED")
    expect(page.locator(".flash")).to_contain_text("Canceled")
    expect(page.locator("button[data-action=cancel]")).to_have_count(0)
    expect(page.locator("button[data-action=replay]")).to_be_visible()
    assert final(stack, key, run_id)["status"] == "CANCELED"

    dash.submit("button[data-action=replay]")
    assert run_id not in page.url
    replayed = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#replayed-from")).to_have_text(run_id)  # and a link back
    with stack.client(key) as client:
        copy = client.get(f"/api/v1/runs/{replayed}").json()
    assert copy["task"] == "sleep" and copy["payload"] == {"seconds": 60}
    assert copy["replayed_from"] == run_id
    page.click("#replayed-from")
    expect(page.locator("#replays")).to_contain_text(replayed)
    with stack.client(key) as client:
        client.post(f"/api/v1/runs/{replayed}/cancel")


def test_the_queues_page_pauses_limits_and_a_run_says_why_it_waits(
    stack: Stack, dashboards: Any
) -> None:
    key = project(stack, "queues")
    queue = f"dash-{secrets.token_hex(3)}"
    with stack.client(key) as client:
        made = client.post("/api/v1/queues", json={"name": queue, "concurrency_limit": 1})
    assert made.status_code == 201
    dash = dashboards()
    dash.sign_in(key)
    page = dash.open("/queues")
    dash.wait_live()
    row = f"tr[data-queue='{queue}']"
    expect(page.locator(f"{row} input[name=limit]")).to_have_value("1")
    expect(page.locator("tr[data-queue='echo']")).to_have_count(1)  # each task's own queue
    dash.submit(f"{row} button[data-action=pause]")
    expect(page.locator(".flash")).to_contain_text(f"{queue} paused")
    expect(page.locator(f"{row} [data-state]")).to_have_text("paused")
    with stack.client(key) as client:
        assert client.get(f"/api/v1/queues/{queue}").json()["paused"]

    run_id = trigger(stack, key, "echo", {"n": 1}, queue=queue)
    page = dash.open(f"/runs/{run_id}")
    expect(page.locator("#waiting-for")).to_have_attribute("data-kind", "paused")
    expect(page.locator("#waiting-for")).to_contain_text(f"its queue {queue} is paused")
    dash.screenshot("run-waiting", full_page=False)
    page = dash.open("/queues")
    dash.wait_live()
    expect(page.locator(f"{row} [data-count=queued]")).to_have_text("1")
    dash.screenshot("queues")
    dash.submit(f"{row} button[data-action=resume]")
    assert final(stack, key, run_id)["status"] == "COMPLETED"
    expect(page.locator(f"{row} [data-count=queued]")).to_have_text("0")

    page.fill(f"{row} input[name=limit]", "3")
    dash.submit(f"{row} button[data-action=limit]")
    expect(page.locator(".flash")).to_contain_text(f"{queue}: 3 at once")
    page.fill(f"{row} input[name=limit]", "many")
    dash.submit(f"{row} button[data-action=limit]")
    expect(page.locator(".flash.error")).to_contain_text("whole number")
    page.fill(f"{row} input[name=limit]", "")
    dash.submit(f"{row} button[data-action=limit]")
    with stack.client(key) as client:
        assert client.get(f"/api/v1/queues/{queue}").json()["concurrency_limit"] is None
    # Another project's queue is not this one's to change.
    other = project(stack, "queues-other")
    with stack.client(other) as client:
        client.post("/api/v1/queues", json={"name": queue + "-x", "concurrency_limit": 2})
    page = dash.open("/queues")
    expect(page.locator(f"tr[data-queue='{queue}-x']")).to_have_count(0)
    with dash.http() as http:
        token = page.locator("input[name=csrf_token]").first.get_attribute("value")
        answer = http.post(
            f"/dashboard/queues/{queue}-x/pause", data={"csrf_token": token}, follow_redirects=False
        )
    assert answer.status_code == 303
    with stack.client(other) as client:
        assert not client.get(f"/api/v1/queues/{queue}-x").json()["paused"]


def test_a_runs_log_lines_appear_on_its_page_as_they_come(
    stack: Stack, dashboards: Any, tmp_path: Path
) -> None:
    key = project(stack, "logs")
    gate = tmp_path / "gate"
    run_id = trigger(stack, key, "tests.logs", {"lines": 4, "every": 0.1, "gate": str(gate)})
    dash = dashboards()
    dash.sign_in(key)
    page = dash.open(f"/runs/{run_id}")
    dash.wait_live()
    page.evaluate("window.notReloaded = true")
    rows = page.locator("#logs tr[data-log-id]")
    expect(rows.nth(1)).to_contain_text("line 0 of attempt 1")
    assert page.locator("#run-status .badge").inner_text() != "COMPLETED"  # held at the gate
    gate.touch()
    expect(page.locator("#run-status .badge")).to_have_text("COMPLETED")
    expect(rows).to_have_count(6)
    expect(rows.last).to_contain_text("almost done")
    expect(page.locator("#logs tr.l-warning")).to_have_count(1)
    expect(rows.nth(2)).to_contain_text("n=1")
    assert page.evaluate("window.notReloaded") is True
    dash.screenshot("run-logs", full_page=False)


def test_the_schedules_page_shows_next_and_last_runs_and_disables(
    stack: Stack, dashboards: Any
) -> None:
    key = project(stack, "schedules")
    with stack.client(key) as client:
        made = client.post(
            "/api/v1/schedules", json={"task": "echo", "cron": "*/2 * * * * *"}
        ).json()
        hourly = client.post("/api/v1/schedules", json={"task": "echo", "cron": "0 * * * *"}).json()
    dash = dashboards()
    dash.sign_in(key)
    page = dash.open("/schedules")
    dash.wait_live()
    row = f"tr[data-schedule='{made['id']}']"
    expect(page.locator(f"{row} [data-state]")).to_have_text("enabled")
    # A next run still to come reads as such, not "just now".
    expect(page.locator(f"tr[data-schedule='{hourly['id']}'] [data-next]")).to_contain_text(
        re.compile(r"^in \d+ (min|s)$")
    )
    # A tick's run shows up as the last run, live.
    expect(page.locator(f"{row} [data-last] a")).to_have_count(1, timeout=15000)
    dash.screenshot("schedules", full_page=False)
    dash.submit(f"{row} button[data-action=disable]")
    expect(page.locator(f"{row} [data-state]")).to_have_text("disabled")
    expect(page.locator(f"{row} [data-next]")).to_have_text("—")
    dash.submit(f"{row} button[data-action=delete]", confirm=True)
    expect(page.locator(row)).to_have_count(0)
    with stack.client(key) as client:
        assert client.get(f"/api/v1/schedules/{made['id']}").status_code == 404


def test_a_waiting_node_is_completed_by_hand_from_its_runs_page(
    stack: Stack, dashboards: Any
) -> None:
    key = project(stack, "waitpoint")
    nodes = [
        {"id": "approve", "type": "wait", "data": {"label": "Approve the crop"}},
        {"id": "after", "type": "delay", "data": {"seconds": 0}},
    ]
    edges = [{"source": "approve", "target": "after", "targetHandle": "input"}]
    run_id = trigger(stack, key, "execute-workflow", {"nodes": nodes, "edges": edges})
    dash = dashboards()
    dash.sign_in(key)
    page = dash.open(f"/runs/{run_id}")
    dash.wait_live()
    form = page.locator("tr[data-node-id=approve] form[data-waitpoint]")
    expect(form).to_have_count(1)
    expect(page.locator("#run-status .badge")).to_have_text("WAITING")
    form.locator("textarea").fill("{not json")
    dash.submit("tr[data-node-id=approve] button[data-action=complete-waitpoint]")
    expect(page.locator(".flash.error")).to_contain_text("JSON")
    form = page.locator("tr[data-node-id=approve] form[data-waitpoint]")
    form.locator("textarea").fill('{"approved": true}')
    dash.screenshot("run-waitpoint", full_page=False)
    dash.submit("tr[data-node-id=approve] button[data-action=complete-waitpoint]")
    expect(page.locator(".flash")).to_contain_text("completed")
    done = final(stack, key, run_id)
    assert done["status"] == "COMPLETED"
    assert done["nodes"]["approve"]["output"] == {"approved": True}
    assert done["nodes"]["after"]["output"]["value"] == {"approved": True}


def test_a_failed_run_shows_its_error_and_attempts(stack: Stack, dashboards: Any) -> None:
    key = project(stack, "failed")
    run_id = trigger(
        stack,
        key,
        "tests.flaky",
        {"succeed_on": 5},
        max_attempts=2,
        retry={"min_delay": 0.05, "max_delay": 0.1},
    )
    run = final(stack, key, run_id)
    dash = dashboards()
    dash.sign_in(key)
    page = dash.open(f"/runs/{run_id}")
    expect(page.locator("#run-status .badge")).to_have_text(run["status"])
    expect(page.locator("#run-error .error-code")).to_have_text(run["error"]["code"])
    expect(page.locator(".timeline li[data-attempt]")).to_have_count(len(run["attempts"]))
    page.click("#history summary")
    expect(page.locator(".history li").last).to_contain_text(run["status"])


def test_resend_a_delivery_from_the_run_page(
    stack: Stack, dashboards: Any, receiver: Receiver
) -> None:
    key = project(stack, "resend")
    path = f"/dash-resend-{secrets.token_hex(4)}"
    with stack.client(key) as client:
        created = client.post(
            "/api/v1/webhooks", json={"url": receiver.url(path), "events": ["run.completed"]}
        )
    assert created.status_code == 201, created.text
    run_id = trigger(stack, key, "echo", {"hello": "resend"})
    final(stack, key, run_id)
    [first] = receiver.wait_calls(path, 1)

    dash = dashboards()
    dash.sign_in(key)
    page = dash.open(f"/runs/{run_id}")
    delivery = page.locator("article.delivery")
    expect(delivery).to_have_count(1)
    expect(delivery).to_have_attribute("data-delivery-status", "delivered")
    expect(delivery.locator("tr[data-attempt]")).to_have_count(1)
    expect(delivery.locator("tr[data-attempt='1'] td.code")).to_have_text("200")

    dash.submit("button[data-action=resend]")
    assert page.url.endswith(f"/dashboard/runs/{run_id}")
    calls = receiver.wait_calls(path, 2)
    assert calls[1].headers["webhook-id"] == first.headers["webhook-id"]
    # The second attempt shows up on the page by itself.
    second = delivery.locator("tr[data-attempt='2']")
    expect(second).to_have_attribute("data-trigger", "resend")
    expect(second.locator("td.code")).to_have_text("200")
    dash.screenshot("run-deliveries")


def test_another_projects_run_is_not_there(stack: Stack, dashboards: Any) -> None:
    owner = project(stack, "owner")
    marker = f"secret-{secrets.token_hex(4)}"
    theirs = trigger(stack, owner, "sleep", {"seconds": 30}, metadata={"note": marker})
    intruder = dashboards()
    page = intruder.sign_in(project(stack, "intruder"))
    expect(page.locator(f"tr[data-run-id='{theirs}']")).to_have_count(0)
    expect(page.locator(".counts .count").first).to_contain_text("0")

    answer = page.goto(f"/dashboard/runs/{theirs}")
    assert answer is not None and answer.status == 404
    assert marker not in page.content()
    with intruder.http() as http:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', http.get("/dashboard/runs").text)
        assert csrf is not None
        cancel = http.post(f"/dashboard/runs/{theirs}/cancel", data={"csrf_token": csrf.group(1)})
        assert cancel.status_code == 303
        fragment = http.get(f"/dashboard/runs/{theirs}", headers={"x-dashboard-fragment": "1"})
        assert fragment.status_code == 404
        feed = http.get("/dashboard/stream", params={"run": theirs})
        assert feed.status_code == 404
    with stack.client(owner) as client:
        run = client.get(f"/api/v1/runs/{theirs}").json()
        assert run["status"] in ("QUEUED", "EXECUTING")  # the intruder's cancel did nothing
        client.post(f"/api/v1/runs/{theirs}/cancel")


# -- workflows -------------------------------------------------------------------------


def workflow(stack: Stack, key: str) -> dict[str, Any]:
    """A workflow with a branch that completes and one that fails."""
    not_an_image = "data:image/png;base64,bm9wZQ=="
    nodes = [
        {"id": "photo", "type": "image", "data": {"label": "Photo", "url": data_uri(quadrants())}},
        {"id": "system", "type": "text", "data": {"label": "System prompt", "text": "Be brief."}},
        {
            "id": "crop",
            "type": "crop-image",
            "data": {
                "label": "Crop top-left",
                "x_percent": 0,
                "y_percent": 0,
                "width_percent": 50,
                "height_percent": 50,
            },
        },
        {
            "id": "describe",
            "type": "llm",
            "data": {"label": "Describe", "user_message": "What colour is this?"},
        },
        {"id": "broken", "type": "image", "data": {"label": "Broken upload", "url": not_an_image}},
        {
            "id": "crop2",
            "type": "crop-image",
            "data": {"label": "Crop broken", "x": 0, "y": 0, "width": 1, "height": 1},
        },
        {"id": "caption", "type": "llm", "data": {"label": "Caption", "user_message": "Caption"}},
    ]
    edges = [
        edge("photo", "crop", "image"),
        edge("crop", "describe", "images"),
        edge("system", "describe", "system_prompt"),
        edge("broken", "crop2", "image"),
        edge("crop2", "caption", "images"),
    ]
    run_id = trigger(stack, key, "execute-workflow", {"nodes": nodes, "edges": edges})
    return final(stack, key, run_id)


def test_a_workflow_run_draws_its_graph_with_each_nodes_status(
    stack: Stack, dashboards: Any, gemini: GeminiStandIn
) -> None:
    key = project(stack, "workflow")
    run = workflow(stack, key)
    assert run["status"] == "FAILED"
    statuses = {node: view["status"] for node, view in run["nodes"].items()}
    assert {"COMPLETED", "FAILED", "SKIPPED"} <= set(statuses.values())

    dash = dashboards()
    dash.sign_in(key)
    page = dash.open(f"/runs/{run['id']}")
    drawn = page.locator("#graph svg g.node")
    expect(drawn).to_have_count(len(statuses))
    for node, status in statuses.items():
        box = page.locator(f"#graph svg g.node[data-node-id='{node}']")
        expect(box).to_have_attribute("data-status", status)
        expect(box.locator("text.status")).to_have_text(status)
    expect(page.locator("#graph svg path.edge")).to_have_count(5)
    expect(page.locator(".artifacts img")).to_have_count(1)  # the crop, shown inline
    # Its bytes come by a second request: wait for the image to have loaded.
    page.wait_for_function(
        "() => { const img = document.querySelector('.artifacts img');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )
    assert page.locator(".artifacts img").evaluate("img => img.naturalWidth") == 100
    dash.screenshot("workflow")
    dash.screenshot("workflow-top", full_page=False)

    # A node that ran is a link to its child run.
    with page.expect_navigation():
        page.click("#graph svg a:has(g.node[data-node-id='crop'])")
    assert page.url.endswith(f"/dashboard/runs/{run['nodes']['crop']['run_id']}")
    expect(page.locator("#run-status .badge")).to_have_text("COMPLETED")
    expect(page.locator(".crumbs")).to_contain_text(run["id"])


def test_an_edge_that_skips_a_layer_goes_round_the_nodes_between(
    stack: Stack, dashboards: Any, gemini: GeminiStandIn
) -> None:
    key = project(stack, "graph-lane")
    nodes = [
        {"id": "brief", "type": "text", "data": {"label": "Brief", "text": "Be brief."}},
        {"id": "first", "type": "llm", "data": {"label": "First", "user_message": "One"}},
        {"id": "second", "type": "llm", "data": {"label": "Second", "user_message": "Two"}},
    ]
    edges = [
        edge("brief", "first", "system_prompt"),
        edge("first", "second", "user_message"),
        edge("brief", "second", "system_prompt"),
    ]
    run = final(
        stack, key, trigger(stack, key, "execute-workflow", {"nodes": nodes, "edges": edges})
    )
    dash = dashboards()
    dash.sign_in(key)
    page = dash.open(f"/runs/{run['id']}")
    expect(page.locator("#graph svg path.edge")).to_have_count(3)
    hidden = page.evaluate(
        """() => {
          const path = document.querySelector(
            "#graph path.edge[data-source='brief'][data-target='second']");
          const node = document.querySelector("#graph g.node[data-node-id='first']");
          const box = node.querySelector("rect.box");
          const [x, y] = node.getAttribute("transform").match(/[-\\d.]+/g).map(Number);
          const w = Number(box.getAttribute("width")), h = Number(box.getAttribute("height"));
          const length = path.getTotalLength();
          let inside = 0;
          for (let i = 0; i <= 100; i++) {
            const p = path.getPointAtLength((length * i) / 100);
            if (p.x > x && p.x < x + w && p.y > y && p.y < y + h) inside++;
          }
          return inside;
        }"""
    )
    assert hidden == 0
    dash.screenshot("workflow-lane", full_page=False)


# -- endpoints ---------------------------------------------------------------------------


def test_endpoints_page_test_event_rotate_disable_enable_recover(
    stack: Stack, dashboards: Any, receiver: Receiver
) -> None:
    key = project(stack, "endpoints")
    path = f"/dash-endpoint-{secrets.token_hex(4)}"
    receiver.script(path, 500)  # the first callback fails, then 200s
    with stack.client(key) as client:
        endpoint = client.post(
            "/api/v1/webhooks", json={"url": receiver.url(path), "description": "orders app"}
        ).json()
    final(stack, key, trigger(stack, key, "echo", {"n": 1}))
    receiver.wait_calls(path, 2)  # the 500, then the retry's 200

    dash = dashboards()
    dash.sign_in(key)
    page = dash.open("/endpoints")
    card = page.locator(f"article.endpoint[data-endpoint-id='{endpoint['id']}']")
    expect(card.locator(".rate")).to_have_attribute("data-rate", "50")
    expect(card).to_contain_text("orders app")
    dash.screenshot("endpoints")

    calls = len(receiver.calls_to(path))
    card.locator("form[action$='/test'] button").click()
    page.wait_for_url(f"**/dashboard/endpoints/{endpoint['id']}")
    expect(page.locator(".flash")).to_contain_text("Test event sent")
    test_call = receiver.wait_calls(path, calls + 1)[-1]
    assert test_call.json()["type"] == "webhook.test"

    dash.submit("form[action$='/rotate'] button", confirm=True)
    shown = page.locator("#secret").inner_text().strip()
    with stack.client(key) as client:
        assert client.get(f"/api/v1/webhooks/{endpoint['id']}/secret").json()["secret"] == shown
    assert shown.startswith("whsec_") and shown != endpoint["secret"]

    dash.open(f"/endpoints/{endpoint['id']}")
    dash.submit("form[action$='/disable'] button", confirm=True)
    expect(page.locator(".endpoint-head .badge")).to_have_text("disabled")
    dash.submit("form[action$='/enable'] button")
    expect(page.locator(".endpoint-head .badge")).to_have_text("enabled")
    dash.submit("form[action$='/recover'] button")
    expect(page.locator(".flash")).to_contain_text("0 failed deliveries of the last 24 h")
    with stack.client(key) as client:
        assert client.get(f"/api/v1/webhooks/{endpoint['id']}").json()["enabled"] is True


def test_add_an_endpoint_and_refuse_a_bad_one(
    stack: Stack, dashboards: Any, receiver: Receiver
) -> None:
    key = project(stack, "add")
    dash = dashboards()
    dash.sign_in(key)
    page = dash.open("/endpoints")
    page.fill("input[name=url]", "http://10.1.2.3/hook")  # a private address: refused
    dash.submit("form[action$='/endpoints'] button[type=submit]")
    expect(page.locator(".flash.error")).to_be_visible()
    with stack.client(key) as client:
        assert client.get("/api/v1/webhooks").json()["data"] == []

    url = receiver.url(f"/dash-add-{secrets.token_hex(4)}")
    page.fill("input[name=url]", url)
    page.fill("input[name=events]", "run.completed, run.failed")
    dash.submit("form[action$='/endpoints'] button[type=submit]")
    secret = page.locator("#secret").inner_text().strip()
    with stack.client(key) as client:
        [endpoint] = client.get("/api/v1/webhooks").json()["data"]
        assert endpoint["url"] == url and endpoint["events"] == ["run.completed", "run.failed"]
        shown = client.get(f"/api/v1/webhooks/{endpoint['id']}/secret").json()["secret"]
    assert secret == shown


# -- the tour: screenshots of the main pages, desktop and phone -------------------------


def test_main_pages_at_desktop_and_phone_width(
    stack: Stack, dashboards: Any, gemini: GeminiStandIn, receiver: Receiver
) -> None:
    key = project(stack, "tour")
    with stack.client(key) as client:
        client.post(
            "/api/v1/webhooks",
            json={"url": receiver.url(f"/dash-tour-{secrets.token_hex(4)}"), "events": ["*"]},
        )
    flow = workflow(stack, key)
    for i in range(3):
        final(stack, key, trigger(stack, key, "echo", {"order": 1000 + i}, tags=["orders"]))
    crop = trigger(
        stack,
        key,
        "crop-image",
        {"image_url": data_uri(quadrants()), "x": 100, "y": 0, "width": 100, "height": 50},
        tags=["thumbnails"],
    )
    final(stack, key, crop)
    final(stack, key, trigger(stack, key, "tests.fail", {"code": "card_declined"}))
    trigger(stack, key, "echo", {"later": True}, delay="1h", tags=["reminders"])
    sleeping = trigger(stack, key, "sleep", {"seconds": 60}, tags=["reports"])

    desktop = dashboards()
    page = desktop.sign_in(key)
    desktop.wait_live()
    expect(page.locator(f"tr[data-run-id='{sleeping}']")).to_have_attribute(
        "data-status", "EXECUTING"
    )
    expect(page.locator("table.runs tbody tr[data-run-id]")).to_have_count(5 + 3 + 3)
    expect(page.locator("[data-count=DELAYED] b")).to_have_text("1")
    desktop.screenshot("runs")
    desktop.open(f"/runs/{crop}")
    expect(page.locator(".artifacts img")).to_have_count(1)
    desktop.screenshot("run")

    phone = dashboards(width=390, height=844)
    phone_page = phone.sign_in(key)
    overflow = "document.documentElement.scrollWidth - window.innerWidth"
    assert phone_page.evaluate(overflow) <= 0
    phone.screenshot("phone-runs")
    phone.open(f"/runs/{flow['id']}")
    expect(phone_page.locator("#graph svg g.node")).to_have_count(len(flow["nodes"]))
    assert phone_page.evaluate(overflow) <= 0  # the graph scrolls inside its box
    phone.screenshot("phone-workflow")

    dark = dashboards(dark=True)
    dark_page = dark.sign_in(key)
    expect(dark_page.locator("table.runs tbody tr[data-run-id]")).to_have_count(11)
    background = "getComputedStyle(document.body).backgroundColor"
    assert dark_page.evaluate(background) != page.evaluate(background)  # follows the system
    dark.screenshot("runs-dark", full_page=False)
    dark.open(f"/runs/{flow['id']}")
    expect(dark_page.locator("#graph svg g.node")).to_have_count(len(flow["nodes"]))
    dark.screenshot("workflow-dark", full_page=False)
    with stack.client(key) as client:
        client.post(f"/api/v1/runs/{sleeping}/cancel")


# -- triggering by hand ---------------------------------------------------------------


def test_trigger_a_run_from_the_form_and_refuse_bad_input(stack: Stack, dashboards: Any) -> None:
    key = project(stack, "trigger")
    dash = dashboards()
    page = dash.sign_in(key)

    def runs() -> list[dict[str, Any]]:
        with stack.client(key) as client:
            return list(client.get("/api/v1/runs").json()["data"])

    dash.open("/trigger")
    page.select_option("select[name=task]", "sleep")
    for payload, problem in [
        ('{"seconds": ', "not valid JSON"),
        ('{"seconds": -1}', "payload.seconds"),
        ('{"seconds": 1, "extra": true}', "payload.extra"),
    ]:
        page.fill("textarea[name=payload]", payload)
        dash.submit("form[action$='/trigger'] button[type=submit]")
        expect(page.locator("#trigger-errors")).to_contain_text(problem)
        assert page.input_value("textarea[name=payload]") == payload  # kept for a fix
    page.fill("textarea[name=payload]", "{}")
    page.fill("input[name=delay]", "soon")
    dash.submit("form[action$='/trigger'] button[type=submit]")
    expect(page.locator("#trigger-errors")).to_contain_text("delay")
    dash.screenshot("trigger")
    assert runs() == []  # nothing was started by any of these

    page.select_option("select[name=task]", "echo")
    page.fill("textarea[name=payload]", '{"hello": "from the form"}')
    page.fill("input[name=tags]", "manual, docs")
    page.fill("input[name=delay]", "")
    dash.submit("form[action$='/trigger'] button[type=submit]")
    expect(page.locator("#run-status .badge")).to_have_text("COMPLETED")
    expect(page.locator("#output")).to_contain_text("from the form")
    [run] = runs()
    assert page.url.endswith(f"/dashboard/runs/{run['id']}")
    assert run["tags"] == ["manual", "docs"] and run["payload"] == {"hello": "from the form"}

    # "Edit and trigger" starts from the run's task, payload and tags.
    page.click("a:has-text('Edit and trigger')")
    assert page.input_value("select[name=task]") == "echo"
    assert "from the form" in page.input_value("textarea[name=payload]")
    assert page.input_value("input[name=tags]") == "manual, docs"
