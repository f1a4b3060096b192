"""The depth check on request bodies (``gateway.api.bodies._depth_ok``).

Bodies refused for nesting are exactly those whose parsed value nests past
``MAX_JSON_DEPTH``, whatever brackets, quotes and escapes their strings
hold, with or without a backslash anywhere (two ways of cutting the strings
out), at the limit and one past it.
"""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from gateway.api.bodies import MAX_JSON_DEPTH, _depth_ok

_TEXTS = ["plain", "[{", "]}", 'a "quoted" [x]', "back\\slash{", "\\", '"', "é[字]"]


def _depth(value: Any) -> int:
    """How deep ``value`` nests: 1 for an empty list, 0 for a number."""
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    return 0


def _value(rng: random.Random, depth: int, texts: list[str]) -> Any:
    """A value that nests exactly ``depth`` deep: one child goes on down, its
    siblings stay shallow."""
    if depth == 0:
        return rng.choice([*texts, 1, None])
    children = [_value(rng, min(depth - 1, rng.randrange(3)), texts) for _ in range(2)]
    children.insert(rng.randrange(3), _value(rng, depth - 1, texts))
    if rng.random() < 0.5:
        return children
    return {rng.choice(texts) + str(i): child for i, child in enumerate(children)}


@pytest.mark.parametrize("escapes", [True, False], ids=["with-escapes", "no-backslash"])
def test_refused_exactly_past_the_limit(escapes: bool) -> None:
    rng = random.Random(64)
    texts = _TEXTS if escapes else [t for t in _TEXTS if "\\" not in t and '"' not in t]
    for _ in range(300):
        target = rng.randrange(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 4)
        value = _value(rng, target, texts)
        # Siblings, so that the body has far more brackets than the limit.
        body = {"events": [_value(rng, 3, texts) for _ in range(30)], "deep": value}
        spaced = json.dumps(body, indent=1, ensure_ascii=False).encode()
        for encoded in (orjson.dumps(body), spaced):
            assert (b"\\" in encoded) == escapes
            assert _depth_ok(encoded) == (_depth(body) <= MAX_JSON_DEPTH), encoded[:120]


def test_brackets_inside_strings_do_not_count() -> None:
    deep_text = "[" * 200 + '\\"' + "{" * 200
    assert _depth_ok(orjson.dumps({"a": [deep_text] * 100}))
    assert _depth_ok(orjson.dumps(["[" * 100] * 100))  # no backslash
    assert not _depth_ok(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert _depth_ok(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
