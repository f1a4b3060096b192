"""Time-ordered, prefixed identifiers (``run_01j…``).

The body is a ULID in lower-case Crockford base32: 48 bits of milliseconds
then 80 random bits, so IDs sort by creation time, which keeps B-tree inserts
cheap and makes cursors stable.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

__all__ = ["id_time", "new_id"]

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"

# Random bits from the OS, 1000 IDs' worth at a time: one system call where
# each ID took one (a trigger makes two IDs).
# Refilled after a fork too, so two processes never share the same bits.
_POOL_BYTES = 10 * 1000
_pool = b""
_pool_pid = 0
_lock = threading.Lock()


def _random_80_bits() -> int:
    global _pool, _pool_pid
    with _lock:
        if len(_pool) < 10 or _pool_pid != os.getpid():
            _pool, _pool_pid = os.urandom(_POOL_BYTES), os.getpid()
        chunk, _pool = _pool[:10], _pool[10:]
    return int.from_bytes(chunk, "big")


def new_id(prefix: str, at: dt.datetime | None = None) -> str:
    """A new ID; its time is ``at`` (to the millisecond) when given, else now."""
    ms = time.time_ns() // 1_000_000 if at is None else int(at.timestamp() * 1000)
    value = ms << 80 | _random_80_bits()
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def id_time(identifier: str) -> float:
    """The time an ID was made with (seconds since the epoch, to the millisecond).

    :raises ValueError: not an ID of :func:`new_id`'s
    """
    body = identifier.rpartition("_")[2]
    if len(body) != 26:
        raise ValueError(f"not an ID: {identifier!r}")
    value = 0
    for char in body:
        digit = _ALPHABET.find(char)
        if digit < 0:
            raise ValueError(f"not an ID: {identifier!r}")
        value = value << 5 | digit
    return (value >> 80) / 1000
