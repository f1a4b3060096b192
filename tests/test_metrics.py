"""GET /metrics: Prometheus text that parses, with the counters moving."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack
from tests.helpers import wait_until
from tests.receiver import Receiver


def scrape(stack: Stack) -> dict[str, list[tuple[dict[str, str], float]]]:
    answer = httpx.get(stack.base_url + "/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v
        for found, v in samples.get(name, [])
        if all(found.get(k) == want for k, want in labels.items())
    )


def test_metrics_count_runs_latency_and_deliveries(stack: Stack) -> None:
    before = scrape(stack)
    for n in range(3):
        assert stack.run("echo", {"n": n})["status"] == "COMPLETED"
    assert stack.run("tests.fail", {})["status"] == "FAILED"
    after = scrape(stack)
    assert (
        value(after, "gateway_runs_total", task="echo", status="COMPLETED")
        - value(before, "gateway_runs_total", task="echo", status="COMPLETED")
        == 3
    )
    assert (
        value(after, "gateway_runs_total", task="tests.fail", status="FAILED")
        - value(before, "gateway_runs_total", task="tests.fail", status="FAILED")
        == 1
    )
    assert (
        value(after, "gateway_run_latency_seconds_count", task="echo")
        - value(before, "gateway_run_latency_seconds_count", task="echo")
        == 3
    )
    assert value(after, "gateway_task_duration_seconds_count", task="echo") >= 3
    assert "gateway_queue_depth" in after
    assert "gateway_runs_in_flight" in after or value(after, "gateway_queue_depth") >= 0


def test_delivery_attempts_are_counted_by_outcome(stack: Stack, receiver: Receiver) -> None:
    key = stack.new_key("metrics-hooks")
    path = f"/metrics/{key[-8:]}"
    receiver.script(path, 500, 200)
    with stack.client(key) as client:
        endpoint = client.post("/api/v1/webhooks", json={"url": receiver.url(path)}).json()
        receiver.verify_with(path, endpoint["secret"])
        before = scrape(stack)
        stack.run("echo", {}, key=key)
    receiver.wait_calls(path, 2)
    wait_until(
        lambda: (
            value(scrape(stack), "gateway_delivery_attempts_total", outcome="succeeded")
            > value(before, "gateway_delivery_attempts_total", outcome="succeeded")
        ),
        what="the successful attempt to be counted",
    )
    after = scrape(stack)
    assert value(after, "gateway_delivery_attempts_total", outcome="http_error") > value(
        before, "gateway_delivery_attempts_total", outcome="http_error"
    )


def test_every_process_settles_its_start_up_objects_out_of_the_collector(stack: Stack) -> None:
    """The web process, the worker and the dispatcher each freeze what they
    made at start-up (``jobs.heap.settle``), so a full collection no longer
    walks it while requests wait; each says how much it froze."""
    # The worker settles once its first arq worker has started: a run proves it.
    assert stack.run("echo", {"settled": True})["status"] == "COMPLETED"
    processes = {"web": stack.gateway, "worker": stack.worker, "dispatch": stack.dispatcher}
    for name, process in processes.items():
        assert process is not None, name
        counts = [
            int(line.split(" objects settled")[0].rsplit(" ", 1)[-1])
            for line in process.log_path.read_text(errors="replace").splitlines()
            if "objects settled at start-up" in line
        ]
        assert counts, f"{name} did not settle: {process.log_tail()}"
        assert min(counts) > 10_000, (name, counts)  # the libraries, the app: not a handful
