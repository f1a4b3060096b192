"""The dashboard's live feed: Server-Sent Events saying "this changed, look again".

One stream per open page. It reads the project's run status changes and
delivery attempts from the database (the truth), so it works behind any number
of gateway processes; a Redis wake-up makes it read at once, and it reads every
``POLL_SECONDS`` anyway (a new run does not publish one). The page answers an
event by fetching its own live part again, so an event never needs to carry
more than which runs it concerns.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.dashboard.queries import Cursor, feed, feed_cursor
from gateway.dashboard.session import viewer_of
from gateway.errors import APIError
from gateway.services import Services

__all__ = ["live_feed"]

#: Seconds between two reads when nothing wakes the stream.
POLL_SECONDS = 1.0
#: The least time between two reads, however busy the project.
MIN_GAP_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0
#: IDs below the head read again each time: a transaction that took an ID
#: earlier may commit later (PostgreSQL sequences), and must not be missed.
WINDOW = 1000
#: Run IDs named in one event at most; past that the page just refreshes.
MAX_NAMED = 50


async def live_feed(request: Request) -> Response:
    services: Services = request.app.state.services
    viewer = await viewer_of(request)
    run_id = request.query_params.get("run") or None
    if run_id is not None:
        await services.runs.get(viewer.project_id, run_id)  # 404 for another project's run
    # The page says where it was rendered up to; a reconnect, where it got to.
    start = Cursor.parse(request.headers.get("last-event-id")) or Cursor.parse(
        request.query_params.get("after")
    )
    head = await services.db.read(feed_cursor)
    # A position past the head (a forged or stale Last-Event-ID) is the head:
    # the stream shows what comes from now on.
    start = head if start is None else start.at_most(head)

    async def events() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        seen: set[tuple[str, int]] = set()
        low = start
        quiet_since = loop.time()
        next_check = loop.time() + services.auth.ttl
        yield "retry: 2000\n\n"
        with services.notifier.watch_any() as changed:
            while True:
                changed.clear()
                read = await services.db.read(feed, viewer.project_id, low, run_id)
                fresh = [e for e in read.entries if (e[0], e[1]) not in seen]
                seen.update((kind, i) for kind, i, _ in fresh)
                if fresh:
                    runs = sorted({r for _, _, r in fresh if r})
                    data = {
                        "runs": runs[:MAX_NAMED],
                        "more": len(runs) > MAX_NAMED,
                        "deliveries": sum(1 for kind, _, _ in fresh if kind == "delivery"),
                    }
                    yield f"id: {read.head}\nevent: change\ndata: {json.dumps(data)}\n\n"
                    quiet_since = loop.time()
                low = Cursor(
                    max(start.transition, read.head.transition - WINDOW),
                    max(start.attempt, read.head.attempt - WINDOW),
                )
                seen = {
                    (kind, i)
                    for kind, i in seen
                    if i > (low.transition if kind == "run" else low.attempt)
                }
                if loop.time() - quiet_since > KEEPALIVE_SECONDS:
                    yield ": keep-alive\n\n"
                    quiet_since = loop.time()
                await asyncio.sleep(MIN_GAP_SECONDS)
                try:
                    await asyncio.wait_for(changed.wait(), timeout=POLL_SECONDS)
                except TimeoutError:
                    pass
                if loop.time() >= next_check:
                    # A session signed out, expired or whose key was revoked
                    # since ends the stream (the page then asks to sign in).
                    try:
                        await viewer_of(request)
                    except APIError as exc:
                        yield f"event: error\ndata: {json.dumps(exc.body())}\n\n"
                        return
                    next_check = loop.time() + services.auth.ttl

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )
