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

It also collects the youngest objects after 20,000 new ones instead of 700: a
request makes thousands of short-lived objects, which reference counting frees
on its own, so the default ran several collections a request for little
(about 5% of a run's CPU in the web process and the worker, measured with
``bench/run.py`` before and after).
"""

from __future__ import annotations

import gc
import logging

__all__ = ["settle"]

log = logging.getLogger("jobs.heap")


def settle() -> None:
    """Collect once, keep every object alive now out of later collections,
    and collect the young ones less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    log.info("%d objects settled at start-up (gc.freeze)", gc.get_freeze_count())
