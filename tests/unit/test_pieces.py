"""Small pieces with no process behind them: job IDs, text made printable,
the proxy's site as a URL, the live feed's cursor, log fields cut to size,
cron instants across DST, and the Redis outage's backoff."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import zoneinfo

import pytest

from gateway.client.text import printable
from gateway.dashboard.queries import Cursor
from gateway.schedules.cron import _instant
from gateway.settings import _site_url
from jobs.protocol import RedisOutage, parse_run_job_id, run_job_id
from jobs.runs.runlog import MAX_FIELDS_BYTES, _jsonable


@pytest.mark.parametrize(("attempt", "step"), [(1, 0), (2, 0), (1, 3), (7, 12)])
def test_a_run_job_id_reads_back(attempt: int, step: int) -> None:
    job_id = run_job_id("run_01m8w66cn6ppeb62yw7w433qzp", attempt, step)
    assert parse_run_job_id(job_id) == ("run_01m8w66cn6ppeb62yw7w433qzp", attempt, step)


@pytest.mark.parametrize(
    "job_id", ["report:abc", "webhook:msg_1:0", "run_x:two", "run_x:1:sx", "run_x:1:s2:9", ""]
)
def test_other_job_ids_are_no_run_attempt(job_id: str) -> None:
    assert parse_run_job_id(job_id) is None


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain", "plain"),
        ("tab\tand\nbreak", "tab\tand\nbreak"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("over\rwrite", "over\\x0dwrite"),
        ("\u202egnp.exe", "\\u202egnp.exe"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("déjà vu ✓", "déjà vu ✓"),
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown


@pytest.mark.parametrize(
    ("site", "url"),
    [
        ("jobs.example.com", "https://jobs.example.com"),
        ("jobs.example.com:8443", "https://jobs.example.com:8443"),
        ("https://jobs.example.com", "https://jobs.example.com"),
        ("localhost", "http://localhost"),
        (":80", None),
        ("", None),
        ("a.example, b.example", "https://a.example"),
    ],
)
def test_a_site_address_as_the_url_clients_use(site: str, url: str | None) -> None:
    assert _site_url(site) == url


@pytest.mark.parametrize(
    ("raw", "cursor"),
    [
        ("12.34", Cursor(12, 34)),
        ("1.2147483648", Cursor(1, 2**31 - 1)),
        ("x.1", None),
        ("1.-2", None),
        ("9" * 19 + ".0", None),
        (None, None),
    ],
)
def test_the_live_feeds_cursor(raw: str | None, cursor: Cursor | None) -> None:
    assert Cursor.parse(raw) == cursor


def test_a_cursor_past_the_head_is_the_head() -> None:
    assert Cursor(10**9, 3).at_most(Cursor(500, 700)) == Cursor(500, 3)


def test_log_fields_are_cut_to_their_budget_and_say_what_was_left_out() -> None:
    fields = {f"k{n}": "v" * 3000 for n in range(10)}
    kept = _jsonable(fields)
    assert kept is not None
    assert len(str(kept)) < MAX_FIELDS_BYTES + 1024
    assert all(isinstance(v, str) and v.endswith("…") for k, v in kept.items() if k != "_truncated")
    assert kept["_truncated"] and set(kept["_truncated"]) < set(fields)
    assert _jsonable({"n": 1, "who": "me"}) == {"n": 1, "who": "me"}
    assert _jsonable({}) is None


BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("wall", "instant"),
    [
        # Skipped by spring forward: at the jump, 03:00 CEST.
        (dt.datetime(2026, 3, 29, 2, 30), dt.datetime(2026, 3, 29, 1, 0, tzinfo=dt.UTC)),
        (dt.datetime(2026, 3, 29, 2, 0), dt.datetime(2026, 3, 29, 1, 0, tzinfo=dt.UTC)),
        # Repeated by fall back: the first occurrence (CEST).
        (dt.datetime(2026, 10, 25, 2, 30), dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.UTC)),
        # An ordinary time.
        (dt.datetime(2026, 6, 1, 9, 0), dt.datetime(2026, 6, 1, 7, 0, tzinfo=dt.UTC)),
    ],
)
def test_a_wall_time_as_an_instant(wall: dt.datetime, instant: dt.datetime) -> None:
    assert _instant(wall, BERLIN) == instant


def test_an_outage_is_said_once_and_its_waits_grow_to_a_ceiling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = RedisOutage("test loop", first=0.001, longest=0.004)

    async def five_failures() -> None:
        for _ in range(5):
            await outage.wait(ConnectionError("refused"))
        outage.over()
        outage.over()  # nothing to end twice

    with caplog.at_level(logging.WARNING, logger="jobs.protocol"):
        asyncio.run(five_failures())
    said = [r.getMessage() for r in caplog.records]
    assert sum("does not answer" in m for m in said) == 1
    assert sum("answers again" in m for m in said) == 1
    assert outage.tries == 0
