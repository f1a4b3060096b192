"""Time-ordered, prefixed identifiers (``run_01j…``).

The body is a ULID in lower-case Crockford base32: 48 bits of milliseconds
then 80 random bits, so IDs sort by creation time, which keeps B-tree inserts
cheap and makes cursors stable.
"""

from __future__ import annotations

import secrets
import time

__all__ = ["new_id"]

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
