"""execute-workflow over real processes, on a worker that runs one job at a time."""

from __future__ import annotations

import base64
import datetime as dt
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Stack
from tests.gemini import GeminiStandIn
from tests.test_tasks import RED, colors, data_uri, quadrants, unique


def trigger(
    stack: Stack, nodes: list[dict[str, Any]], edges: list[dict[str, Any]]
) -> httpx.Response:
    with stack.client() as client:
        return client.post(
            "/api/v1/tasks/execute-workflow/trigger",
            json={"payload": {"nodes": nodes, "edges": edges}},
        )


def run_workflow(
    stack: Stack, nodes: list[dict[str, Any]], edges: list[dict[str, Any]]
) -> dict[str, Any]:
    accepted = trigger(stack, nodes, edges)
    assert accepted.status_code == 202, accepted.text
    with stack.client() as client:
        final = client.get(f"/api/v1/runs/{accepted.json()['id']}", params={"wait": 60}).json()
    assert final["is_final"], final
    return dict(final)


def edge(source: str, target: str, handle: str) -> dict[str, Any]:
    return {"source": source, "target": target, "sourceHandle": "out", "targetHandle": handle}


def child(stack: Stack, run_id: str) -> dict[str, Any]:
    with stack.client() as client:
        return dict(client.get(f"/api/v1/runs/{run_id}").json())


def at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_image_crop_llm_end_to_end(single_slot_stack: Stack, gemini: GeminiStandIn) -> None:
    stack = single_slot_stack
    marker = unique("wf-marker")
    nodes = [
        {"id": "img", "type": "image", "data": {"url": data_uri(quadrants())}},
        {"id": "sys", "type": "text", "data": {"text": "You name colours."}},
        {
            "id": "crop",
            "type": "crop-image",
            # React Flow's display label: shown by editors, never sent to the task.
            "data": {
                "label": "Top-left quarter",
                "x_percent": 0,
                "y_percent": 0,
                "width_percent": 50,
                "height_percent": 50,
            },
        },
        {"id": "ask", "type": "llm", "data": {"user_message": f"{marker} which colour?"}},
    ]
    edges = [
        edge("img", "crop", "image"),
        edge("crop", "ask", "images"),
        edge("sys", "ask", "system_prompt"),
    ]
    run = run_workflow(stack, nodes, edges)
    assert run["status"] == "COMPLETED", run["error"]

    statuses = {n: v["status"] for n, v in run["nodes"].items()}
    assert statuses == {
        "img": "COMPLETED",
        "sys": "COMPLETED",
        "crop": "COMPLETED",
        "ask": "COMPLETED",
    }
    crop_run = child(stack, run["nodes"]["crop"]["run_id"])
    ask_run = child(stack, run["nodes"]["ask"]["run_id"])
    assert crop_run["parent_id"] == ask_run["parent_id"] == run["id"]
    assert (crop_run["node_id"], ask_run["node_id"]) == ("crop", "ask")
    assert "label" not in crop_run["payload"]
    assert run["nodes"]["img"]["run_id"] is None  # value nodes need no run

    # The crop's artifact downloads, and the model saw exactly its bytes.
    artifact = httpx.get(crop_run["output"]["url"])
    assert artifact.status_code == 200 and colors(artifact.content) == {RED}
    [sent] = gemini.requests_with(marker)
    assert sent.images == [("image/png", artifact.content)]
    assert sent.system_text == "You name colours."
    assert run["output"]["outputs"] == {"ask": ask_run["output"]}
    assert run["output"]["failed_nodes"] == []
    assert (
        run["output"]["nodes"]["crop"]["output"]["artifact_id"] == crop_run["output"]["artifact_id"]
    )

    # The workflow waited between steps, and never ran two jobs at once.
    rows = stack.query(
        "SELECT to_status FROM run_transitions WHERE run_id = :id ORDER BY id", id=run["id"]
    )
    assert "WAITING" in [r[0] for r in rows]


def test_a_diamond_runs_both_branches_in_the_same_span(single_slot_stack: Stack) -> None:
    stack = single_slot_stack
    nodes = [
        {"id": "top", "type": "text", "data": {"text": "diamond-marker"}},
        {"id": "left", "type": "llm", "data": {}},
        {"id": "right", "type": "llm", "data": {}},
        {"id": "bottom", "type": "llm", "data": {}},
    ]
    edges = [
        edge("top", "left", "user_message"),
        edge("top", "right", "user_message"),
        edge("left", "bottom", "user_message"),
        edge("right", "bottom", "system_prompt"),
    ]
    run = run_workflow(stack, nodes, edges)
    assert run["status"] == "COMPLETED", run["error"]
    left = child(stack, run["nodes"]["left"]["run_id"])
    right = child(stack, run["nodes"]["right"]["run_id"])
    bottom = child(stack, run["nodes"]["bottom"]["run_id"])
    # Both branches were started together and each was under way while the
    # other was: their spans overlap, though one worker slot ran them in turn.
    assert at(left["created_at"]) < at(right["finished_at"])
    assert at(right["created_at"]) < at(left["finished_at"])
    # The join ran only after both.
    assert at(bottom["created_at"]) >= max(at(left["finished_at"]), at(right["finished_at"]))
    assert bottom["payload"]["user_message"] == left["output"]["text"]
    assert bottom["payload"]["system_prompt"] == right["output"]["text"]


def test_a_failing_branch_fails_the_workflow_and_skips_what_follows_it(
    single_slot_stack: Stack,
) -> None:
    stack = single_slot_stack
    not_an_image = "data:image/png;base64," + base64.b64encode(b"nope").decode()
    nodes = [
        {"id": "bad", "type": "image", "data": {"url": not_an_image}},
        {"id": "crop", "type": "crop-image", "data": {"x": 0, "y": 0, "width": 1, "height": 1}},
        {"id": "after", "type": "llm", "data": {"user_message": "never asked"}},
        {"id": "q", "type": "text", "data": {"text": "other branch"}},
        {"id": "fine", "type": "llm", "data": {}},
    ]
    edges = [
        edge("bad", "crop", "image"),
        edge("crop", "after", "images"),
        edge("q", "fine", "user_message"),
    ]
    run = run_workflow(stack, nodes, edges)
    assert run["status"] == "FAILED"
    assert run["error"]["code"] == "node_failed"
    assert run["output"]["failed_nodes"] == ["crop"]
    assert run["nodes"]["crop"]["status"] == "FAILED"
    assert run["nodes"]["crop"]["error"]["code"] == "invalid_image"
    assert run["nodes"]["after"]["status"] == "SKIPPED"
    assert run["nodes"]["after"]["run_id"] is None
    assert run["nodes"]["fine"]["status"] == "COMPLETED"
    children = stack.query("SELECT node_id FROM runs WHERE parent_id = :id", id=run["id"])
    assert sorted(r[0] for r in children) == ["crop", "fine"]  # "after" never ran


INVALID = [
    pytest.param(
        [
            {"id": "a", "type": "text", "data": {"text": "x"}},
            {"id": "b", "type": "llm", "data": {}},
            {"id": "c", "type": "llm", "data": {}},
        ],
        [
            edge("a", "b", "user_message"),
            edge("b", "c", "user_message"),
            edge("c", "b", "system_prompt"),
        ],
        "cycle",
        "b -> c -> b",
        id="cycle",
    ),
    pytest.param(
        [{"id": "a", "type": "teleport", "data": {}}],
        [],
        "unknown_node_type",
        "teleport",
        id="unknown-type",
    ),
    pytest.param(
        [{"id": "a", "type": "text", "data": {"text": "x"}}],
        [edge("a", "ghost", "user_message")],
        "missing_node",
        "ghost",
        id="edge-to-missing-node",
    ),
    pytest.param(
        [
            {"id": "a", "type": "text", "data": {"text": "x"}},
            {"id": "b", "type": "llm", "data": {"user_message": "hi"}},
        ],
        [edge("a", "b", "volume")],
        "missing_input",
        "volume",
        id="missing-input",
    ),
    pytest.param(
        [{"id": "b", "type": "llm", "data": {}}],
        [],
        "missing_value",
        "user_message",
        id="required-input-without-value",
    ),
    pytest.param(
        [{"id": "c", "type": "crop-image", "data": {"x": 0, "y": 0, "width": 1, "height": 1}}],
        [],
        "missing_value",
        "image",
        id="crop-without-image",
    ),
    pytest.param(
        [
            {"id": "i", "type": "image", "data": {"url": "data:,x"}},
            {"id": "b", "type": "llm", "data": {}},
        ],
        [edge("i", "b", "user_message")],
        "incompatible_edge",
        "takes text",
        id="image-into-text",
    ),
]


@pytest.mark.parametrize(("nodes", "edges", "kind", "text"), INVALID)
def test_invalid_graphs_are_refused_with_422(
    single_slot_stack: Stack,
    nodes: list[dict[str, Any]],
    edges: list[dict[str, Any]],
    kind: str,
    text: str,
) -> None:
    before = single_slot_stack.query("SELECT COUNT(*) FROM runs")[0][0]
    answer = trigger(single_slot_stack, nodes, edges)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_payload"
    matching = [d for d in error["details"] if d["type"] == kind]
    assert matching, error["details"]
    assert text in matching[0]["message"]
    assert matching[0]["path"].startswith("payload.")
    assert single_slot_stack.query("SELECT COUNT(*) FROM runs")[0][0] == before


def test_a_workflow_run_lists_its_nodes_while_it_runs(single_slot_stack: Stack) -> None:
    stack = single_slot_stack
    image = io.BytesIO()
    Image.new("RGB", (10, 10), RED).save(image, format="PNG")
    accepted = trigger(
        stack,
        [
            {"id": "img", "type": "image", "data": {"url": data_uri(image.getvalue())}},
            {"id": "crop", "type": "crop-image", "data": {"x": 0, "y": 0, "width": 5, "height": 5}},
        ],
        [edge("img", "crop", "image")],
    )
    assert accepted.status_code == 202
    first = accepted.json()
    assert first["status"] == "QUEUED"
    assert set(first["nodes"]) == {"img", "crop"} or first["nodes"] == {}
    with stack.client() as client:
        final = client.get(f"/api/v1/runs/{first['id']}", params={"wait": 60}).json()
    assert final["status"] == "COMPLETED"
    assert {n: v["type"] for n, v in final["nodes"].items()} == {
        "img": "image",
        "crop": "crop-image",
    }


def test_replay_from_a_node_reuses_every_output_upstream(
    stack: Stack, gemini: GeminiStandIn
) -> None:
    nodes = [
        {"id": "img", "type": "image", "data": {"url": data_uri(quadrants())}},
        {
            "id": "crop",
            "type": "crop-image",
            "data": {"x_percent": 0, "y_percent": 0, "width_percent": 50, "height_percent": 50},
        },
        {"id": "caption", "type": "llm", "data": {"user_message": unique("caption") + " colour?"}},
    ]
    edges = [edge("img", "crop", "image"), edge("crop", "caption", "images")]
    first = run_workflow(stack, nodes, edges)
    assert first["status"] == "COMPLETED", first["error"]
    with stack.client() as client:
        answer = client.post(f"/api/v1/runs/{first['id']}/replay", json={"from_node": "caption"})
        assert answer.status_code == 202, answer.text
        replay = client.get(f"/api/v1/runs/{answer.json()['id']}", params={"wait": 60}).json()
    assert replay["status"] == "COMPLETED", replay["error"]
    assert replay["replayed_from"] == first["id"]
    children = stack.query(
        "SELECT node_id FROM runs WHERE parent_id = :p ORDER BY node_id", p=replay["id"]
    )
    assert children == [("caption",)]  # no child run upstream of it
    assert replay["nodes"]["crop"]["run_id"] == first["nodes"]["crop"]["run_id"]
    assert replay["nodes"]["crop"]["output"] == first["nodes"]["crop"]["output"]
    assert replay["nodes"]["caption"]["run_id"] != first["nodes"]["caption"]["run_id"]
    assert replay["output"]["outputs"]["caption"]
    with stack.client() as client:
        again = client.post(f"/api/v1/runs/{first['id']}/replay", json={"from_node": "crop"})
        crop_replay = client.get(f"/api/v1/runs/{again.json()['id']}", params={"wait": 60}).json()
        assert crop_replay["status"] == "COMPLETED"
        refused = client.post(f"/api/v1/runs/{first['id']}/replay", json={"from_node": "nope"})
        assert refused.status_code == 422
        assert refused.json()["error"]["details"][0]["path"] == "from_node"
        plain = client.post("/api/v1/tasks/echo/trigger", json={"payload": 1}).json()
        not_a_workflow = client.post(f"/api/v1/runs/{plain['id']}/replay", json={"from_node": "x"})
        assert not_a_workflow.status_code == 422
    assert stack.query(
        "SELECT node_id FROM runs WHERE parent_id = :p ORDER BY node_id", p=crop_replay["id"]
    ) == [("caption",), ("crop",)]
