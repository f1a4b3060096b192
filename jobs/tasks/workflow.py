"""The ``execute-workflow`` task: a React Flow graph run node by node as child runs.

A workflow runs in steps. A step is one short job: from the graph and the
states of its nodes so far (handed to it by the gateway), it resolves what it
can at once (``text`` and ``image`` nodes), names the executable nodes whose
inputs are now all there (each becomes a child run of its own task), and
then ends. The gateway marks the workflow WAITING, and each child's final
event makes it queue the next step, so a waiting workflow holds no worker
slot (docs/architecture.md, invariant 5).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.protocol import WORKFLOW_TASK
from jobs.tasks.images import CropPayload
from jobs.tasks.llm import LlmPayload
from jobs.tasks.registry import TaskContext, TaskError, task

__all__ = [
    "NODE_TYPES",
    "Waiting",
    "WorkflowPayload",
    "check_workflow",
    "plan_step",
]


@dataclasses.dataclass(frozen=True)
class NodeType:
    #: The task a node of this type runs as a child run; ``None`` for a value node.
    task: str | None
    #: Input name → the kind of value it takes ("image" or "text") and whether
    #: it collects several edges into a list.
    inputs: Mapping[str, tuple[str, bool]]
    #: The kind of value the node's output is, for the inputs it feeds.
    output: str
    #: Inputs that must have a value, from ``data`` or an edge.
    required: tuple[str, ...] = ()


NODE_TYPES: dict[str, NodeType] = {
    "text": NodeType(task=None, inputs={}, output="text"),
    "image": NodeType(task=None, inputs={}, output="image"),
    "crop-image": NodeType(
        task="crop-image", inputs={"image": ("image", False)}, output="image", required=("image",)
    ),
    # A waitpoint: completed by a POST to its URL (the body is the node's
    # output), or failed after data.timeout.
    "wait": NodeType(task=None, inputs={"input": ("any", False)}, output="any"),
    # Waits data.seconds (or until data.until) without a worker slot, then
    # passes on what its input gave it.
    "delay": NodeType(task=None, inputs={"input": ("any", False)}, output="any"),
    "llm": NodeType(
        task="llm",
        inputs={
            "images": ("image", True),
            "system_prompt": ("text", False),
            "user_message": ("text", False),
        },
        output="text",
        required=("user_message",),
    ),
}
#: Keys of a node's ``data`` that an editor shows (React Flow's ``label``);
#: never part of the child run's payload.
DISPLAY_KEYS = ("label",)
#: Keys of a crop-image node's ``data`` that already give it an image.
_IMAGE_KEYS = ("image", "image_url", "image_base64", "artifact_id")
_DATA_MODELS: dict[str, type[BaseModel]] = {"crop-image": CropPayload, "llm": LlmPayload}


class Node(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=200)
    type: str
    data: dict[str, Any] = Field(default_factory=dict)


class Edge(BaseModel):
    model_config = ConfigDict(extra="allow")

    source: str
    target: str
    sourceHandle: str | None = None
    targetHandle: str | None = None


class WorkflowPayload(BaseModel):
    model_config = ConfigDict(extra="allow")

    nodes: list[Node] = Field(min_length=1, max_length=200)
    edges: list[Edge] = Field(default_factory=list, max_length=1000)


def _detail(path: str, kind: str, message: str) -> dict[str, str]:
    return {"path": path, "type": kind, "message": message}


def _cycle(nodes: list[str], edges: Iterable[tuple[str, str]]) -> list[str] | None:
    """The nodes of one cycle, in order, or ``None``."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for source, target in edges:
        graph[source].append(target)
    color = dict.fromkeys(nodes, 0)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if color[nxt] == 1:
                return [*path[path.index(nxt) :], nxt]
            if color[nxt] == 0 and (found := visit(nxt)) is not None:
                return found
        path.pop()
        color[node] = 2
        return None

    for node in nodes:
        if color[node] == 0 and (found := visit(node)) is not None:
            return found
    return None


def check_workflow(payload: Any) -> list[dict[str, str]]:
    """Everything wrong with a workflow payload, as 422 details (empty if fine)."""
    try:
        workflow = WorkflowPayload.model_validate(payload)
    except ValidationError:
        return []  # the payload model's own errors are reported by the caller
    details: list[dict[str, str]] = []
    ids: dict[str, Node] = {}
    for i, node in enumerate(workflow.nodes):
        if node.id in ids:
            details.append(_detail(f"nodes.{i}.id", "duplicate_node", f"node {node.id!r} twice"))
        ids[node.id] = node
        if node.type not in NODE_TYPES:
            details.append(
                _detail(
                    f"nodes.{i}.type",
                    "unknown_node_type",
                    f"unknown node type {node.type!r}; known: " + ", ".join(NODE_TYPES),
                )
            )
    fed: dict[str, set[str]] = {n: set() for n in ids}
    good_edges: list[tuple[str, str]] = []
    for i, edge in enumerate(workflow.edges):
        ok = True
        for end in ("source", "target"):
            if getattr(edge, end) not in ids:
                details.append(
                    _detail(f"edges.{i}.{end}", "missing_node", f"no node {getattr(edge, end)!r}")
                )
                ok = False
        if not ok:
            continue
        source_type = NODE_TYPES.get(ids[edge.source].type)
        target_type = NODE_TYPES.get(ids[edge.target].type)
        if source_type is None or target_type is None:
            continue
        handle = edge.targetHandle or ""
        if handle not in target_type.inputs:
            details.append(
                _detail(
                    f"edges.{i}.targetHandle",
                    "missing_input",
                    f"node {edge.target!r} ({ids[edge.target].type}) has no input {handle!r}; "
                    f"inputs: {', '.join(target_type.inputs) or 'none'}",
                )
            )
            continue
        kind = target_type.inputs[handle][0]
        if kind != source_type.output and "any" not in (kind, source_type.output):
            details.append(
                _detail(
                    f"edges.{i}",
                    "incompatible_edge",
                    f"{edge.source!r} gives {source_type.output}, but {handle!r} of "
                    f"{edge.target!r} takes {kind}",
                )
            )
            continue
        fed[edge.target].add(handle)
        good_edges.append((edge.source, edge.target))
    for i, node in enumerate(workflow.nodes):
        node_type = NODE_TYPES.get(node.type)
        if node_type is None:
            continue
        if node.type == "text" and not isinstance(node.data.get("text"), str):
            details.append(
                _detail(
                    f"nodes.{i}.data.text",
                    "missing_value",
                    f"text node {node.id!r} needs data.text",
                )
            )
        if node.type == "delay" and not _delay_ok(node.data):
            details.append(
                _detail(
                    f"nodes.{i}.data.seconds",
                    "missing_value",
                    f"delay node {node.id!r} needs data.seconds (0 to a year) or data.until "
                    "(an ISO-8601 time)",
                )
            )
        if node.type == "wait" and node.data.get("timeout") is not None:
            if _duration(node.data["timeout"]) is None:
                details.append(
                    _detail(
                        f"nodes.{i}.data.timeout",
                        "value_error",
                        f"wait node {node.id!r}: a timeout is seconds or a duration like 1h",
                    )
                )
        if node.type == "image" and not isinstance(node.data.get("url"), str):
            details.append(
                _detail(
                    f"nodes.{i}.data.url", "missing_value", f"image node {node.id!r} needs data.url"
                )
            )
        for name in node_type.required:
            has_data = (
                any(node.data.get(k) for k in _IMAGE_KEYS)
                if name == "image"
                else bool(node.data.get(name))
            )
            if not has_data and name not in fed[node.id]:
                details.append(
                    _detail(
                        f"nodes.{i}.data.{name}",
                        "missing_value",
                        f"node {node.id!r} needs {name!r}, from data or an edge",
                    )
                )
    if not any(d["type"] == "duplicate_node" for d in details):
        cycle = _cycle(list(ids), good_edges)
        if cycle is not None:
            details.append(
                _detail("edges", "cycle", "the graph has a cycle: " + " -> ".join(cycle))
            )
    return details


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_YEAR = 365 * 24 * 3600.0


def _duration(value: Any) -> float | None:
    """Seconds from ``30``, ``"30s"``, ``"1h"``; ``None`` if it is not one (or over a year)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match[1]) * _UNITS[match[2]]
    else:
        return None
    return seconds if 0 <= seconds <= _YEAR else None


def _delay_ok(data: Mapping[str, Any]) -> bool:
    if data.get("seconds") is not None:
        return _duration(data["seconds"]) is not None
    until = data.get("until")
    if not isinstance(until, str):
        return False
    try:
        dt.datetime.fromisoformat(until.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


# -- running -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A step's result while the workflow goes on: children to start, wait and
    delay nodes to set waiting, node states."""

    spawn: list[dict[str, Any]]
    nodes: dict[str, dict[str, Any]]
    waits: list[dict[str, Any]] = dataclasses.field(default_factory=list)


FINAL_NODE = ("completed", "failed", "skipped")


def _value_of(node: Node, state: Mapping[str, Any], edge: Edge | None = None) -> Any:
    """What a finished node hands to the inputs its edges feed. A ``wait``
    node's edge may name a field of the posted body (``sourceHandle``)."""
    output = state.get("output")
    if node.type == "wait" and edge is not None and isinstance(output, dict):
        field = edge.sourceHandle
        if field and field not in ("out", "output") and field in output:
            return output[field]
    if node.type == "delay" and isinstance(output, dict) and "value" in output:
        return output["value"]
    if node.type == "crop-image" and isinstance(output, dict):
        return {"artifact_id": output.get("artifact_id"), "url": output.get("url")}
    if node.type == "llm" and isinstance(output, dict):
        return output.get("text")
    if isinstance(output, dict) and node.type == "text":
        return output.get("text")
    if isinstance(output, dict) and node.type == "image":
        return output.get("image")
    return output


def _inputs(
    node: Node, incoming: list[tuple[Edge, Node]], states: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    payload = {k: v for k, v in node.data.items() if k not in DISPLAY_KEYS}
    node_type = NODE_TYPES[node.type]
    for edge, source in incoming:
        handle = edge.targetHandle or ""
        value = _value_of(source, states[source.id], edge)
        if node_type.inputs[handle][0] == "text" and not isinstance(value, str):
            value = json.dumps(value)  # a waitpoint's body, for a text input
        if node_type.inputs[handle][1]:
            payload[handle] = [*payload.get(handle, []), value]
        elif handle == "user_message" and payload.get(handle) and handle in payload:
            payload[handle] = f"{payload[handle]}\n\n{value}"
        else:
            payload[handle] = value
    if node.type == "crop-image" and "image" in payload:
        for key in ("image_url", "image_base64", "artifact_id"):
            payload.pop(key, None)
    return payload


def plan_step(
    workflow: WorkflowPayload, states: Mapping[str, Mapping[str, Any]]
) -> Waiting | dict[str, Any]:
    """What to do now: a :class:`Waiting`, or the workflow's final output."""
    nodes = {n.id: n for n in workflow.nodes}
    current: dict[str, dict[str, Any]] = {k: dict(v) for k, v in states.items()}
    incoming: dict[str, list[tuple[Edge, Node]]] = {n: [] for n in nodes}
    for edge in workflow.edges:
        incoming[edge.target].append((edge, nodes[edge.source]))
    spawn: list[dict[str, Any]] = []
    waits: list[dict[str, Any]] = []
    changed = True
    while changed:  # value nodes resolve at once, which may ready their targets
        changed = False
        for node_id, node in nodes.items():
            if node_id in current:
                continue
            upstream = [current.get(src.id, {}).get("status") for _, src in incoming[node_id]]
            if any(s in ("failed", "skipped") for s in upstream):
                current[node_id] = {"status": "skipped"}
                changed = True
            elif all(s == "completed" for s in upstream):
                if node.type == "text":
                    current[node_id] = {
                        "status": "completed",
                        "output": {"text": node.data.get("text")},
                    }
                elif node.type == "image":
                    current[node_id] = {
                        "status": "completed",
                        "output": {"image": node.data.get("url")},
                    }
                elif node.type in ("wait", "delay"):
                    waits.append(_wait_spec(node, incoming[node_id], current))
                    current[node_id] = {"status": "waiting"}
                else:
                    task_name = NODE_TYPES[node.type].task
                    spawn.append(
                        {
                            "node_id": node_id,
                            "task": task_name,
                            "payload": _inputs(node, incoming[node_id], current),
                        }
                    )
                    current[node_id] = {"status": "running"}
                changed = True
    if spawn or waits or any(s.get("status") not in FINAL_NODE for s in current.values()):
        return Waiting(spawn=spawn, nodes=current, waits=waits)
    sinks = [n for n in nodes if not any(e.source == n for e in workflow.edges)]
    failed = sorted(n for n, s in current.items() if s["status"] == "failed")
    return {
        "nodes": {
            n: {
                "status": s["status"].upper(),
                "output": s.get("output"),
                **({"error": s["error"]} if s.get("error") else {}),
            }
            for n, s in current.items()
        },
        "outputs": {
            n: current[n].get("output") for n in sinks if current[n]["status"] == "completed"
        },
        "failed_nodes": failed,
    }


def _wait_spec(
    node: Node, incoming: list[tuple[Edge, Node]], states: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """What the gateway needs to set a ``wait`` or ``delay`` node waiting."""
    value = (
        _value_of(incoming[0][1], states[incoming[0][1].id], incoming[0][0]) if incoming else None
    )
    if node.type == "wait":
        timeout = node.data.get("timeout")
        return {
            "node_id": node.id,
            "kind": "wait",
            "timeout": _duration(timeout) if timeout is not None else None,
            "value": value,
        }
    seconds = node.data.get("seconds")
    return {
        "node_id": node.id,
        "kind": "delay",
        "seconds": _duration(seconds) if seconds is not None else None,
        "until": node.data.get("until") if seconds is None else None,
        "value": value,
    }


def _check_payload(payload: Any) -> list[dict[str, str]]:
    return check_workflow(payload)


@task(WORKFLOW_TASK, payload=WorkflowPayload, check=_check_payload)
async def execute_workflow(payload: WorkflowPayload, ctx: TaskContext) -> Any:
    """Run a React Flow graph of text, image, crop-image, llm, wait and delay nodes."""
    details = check_workflow(payload.model_dump())
    if details:
        raise TaskError("invalid_workflow", "; ".join(d["message"] for d in details))
    result = plan_step(payload, ctx.workflow or {})
    if isinstance(result, Waiting):
        return result
    if result["failed_nodes"]:
        raise WorkflowFailed(result)
    return result


class WorkflowFailed(TaskError):
    """A node failed: the workflow fails, with every node's state as its output."""

    def __init__(self, output: dict[str, Any]) -> None:
        failed = output["failed_nodes"]
        super().__init__("node_failed", f"node(s) failed: {', '.join(failed)}")
        self.output = output
