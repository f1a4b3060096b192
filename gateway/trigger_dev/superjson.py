"""Payloads the Trigger.dev SDK sends as superjson, read as plain JSON.

The SDK serializes a payload with superjson: ``{"json": <value>, "meta":
{"values": {<path>: [<type>, ...]}}}``, where ``json`` is already JSON and
``meta`` says which values stood for a JavaScript type JSON lacks. A Python
task receives JSON, so each such value becomes the JSON a reader expects
(docs/trigger-dev.md, "Payloads"):

| JavaScript | in the task's payload |
| --- | --- |
| ``Date`` | its ISO-8601 string, as superjson sent it |
| ``undefined`` | the key left out (in an array: ``null``) |
| ``bigint`` | an integer |
| ``Map`` | an object when every key is a string, else a list of ``[key, value]`` |
| ``Set`` | a list |
| ``regexp``, ``URL``, ``Error``, ``symbol`` | a string (an error's message) |
| ``number`` (``NaN``, ``Infinity``) | refused: JSON has no such number |

A path is the value's keys joined by ``.`` (superjson escapes a ``.`` in a
key as ``\\.``). Nested annotations (``["map", {...}]``) apply inside.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["SuperjsonRefused", "decode"]


class SuperjsonRefused(ValueError):
    """A superjson value that has no JSON form (``NaN``, ``Infinity``), or a
    document that is not superjson. ``path`` names the value."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


_UNDEFINED = object()


def _split(path: str) -> list[str]:
    """``a.b\\.c.0`` → ``["a", "b.c", "0"]``."""
    return [part.replace("\\.", ".") for part in re.split(r"(?<!\\)\.", path)]


def _convert(value: Any, kind: Any, where: str) -> Any:
    name = kind[0] if isinstance(kind, list) else kind
    if isinstance(name, list):  # a custom or class annotation: keep the JSON
        return value
    if name == "undefined":
        return _UNDEFINED
    if name == "bigint":
        return int(value)
    if name == "Date":
        return value
    if name == "set":
        return list(value)
    if name == "map":
        pairs = [list(p) for p in value]
        if all(isinstance(k, str) for k, _ in pairs):
            return {k: v for k, v in pairs}
        return pairs
    if name == "number":
        raise SuperjsonRefused(where, f"{value} is not a number JSON can hold")
    if name == "Error" and isinstance(value, dict):
        return str(value.get("message", ""))
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _apply(tree: Any, annotations: Any, prefix: str) -> Any:
    """Apply superjson's value annotations (a tree keyed by path) to ``tree``."""
    if isinstance(annotations, list):  # the annotation of the root value itself
        converted = _convert(tree, annotations, prefix or "payload")
        inner = annotations[1] if len(annotations) > 1 and isinstance(annotations[1], dict) else {}
        return _apply(converted, inner, prefix) if inner else converted
    for path, kind in annotations.items():
        parts = _split(path)
        parent: Any = tree
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        key: Any = int(last) if isinstance(parent, list) else last
        where = ".".join(filter(None, [prefix, path]))
        current = parent[key]
        if isinstance(kind, list) and len(kind) > 1 and isinstance(kind[1], dict):
            current = _apply(current, kind[1], where)  # nested: the inside first
        parent[key] = _convert(current, kind, where)
    return tree


def _drop_undefined(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_undefined(v) for k, v in value.items() if v is not _UNDEFINED}
    if isinstance(value, list):
        return [None if v is _UNDEFINED else _drop_undefined(v) for v in value]
    return value


def decode(document: Any, *, field: str = "payload") -> Any:
    """The plain JSON a superjson ``document`` (already parsed) stands for.

    :raises SuperjsonRefused: not a superjson document, or a value JSON lacks
    """
    if not isinstance(document, dict) or "json" not in document:
        raise SuperjsonRefused(field, 'a superjson document is an object with a "json" key')
    value = document["json"]
    values = (document.get("meta") or {}).get("values")
    if values:
        try:
            value = _apply(value, values, field)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            if isinstance(exc, SuperjsonRefused):
                raise
            raise SuperjsonRefused(field, f"its meta does not fit its json: {exc}") from None
    value = _drop_undefined(value)
    return None if value is _UNDEFINED else value
