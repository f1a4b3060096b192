"""What a long-running process keeps for life, out of the collector's way.

CPython's cyclic garbage collector now and then walks every object it tracks:
a full collection in a process that imported SQLAlchemy, pydantic and the
task modules walks hundreds of thousands of them, and the event loop stands
still meanwhile (every request in flight waits). Nearly all of them are made
at start-up and live as long as the process. :func:`settle`, called once a
process is ready to serve, collects once and then freezes what is left
(``gc.freeze``), so later collections walk only what the work made since.
Cycles among the frozen objects are never collected: none are made there
after start-up.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["settle"]

log = logging.getLogger("jobs.heap")


def settle() -> None:
    """Collect once, then keep every object alive now out of later collections."""
    gc.collect()
    gc.freeze()
    log.info("%d objects settled at start-up (gc.freeze)", gc.get_freeze_count())
