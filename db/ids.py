"""Time-ordered, prefixed identifiers (``run_01j…``).

The body is a ULID in lower-case Crockford base32: 48 bits of milliseconds
then 80 random bits, so IDs sort by creation time, which keeps B-tree inserts
cheap and makes cursors stable.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["new_id"]

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


def new_id(prefix: str) -> str:
    value = (time.time_ns() // 1_000_000) << 80 | _random_80_bits()
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
