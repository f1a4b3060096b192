"""What a run's status move writes on PostgreSQL, by schema revision.

    BENCH_DATABASE_URL=postgresql+asyncpg://… python -m bench.wal [--runs 3000] [0015 head]

For each revision (oldest first, alternating, twice): a fresh database at that
revision, ``--runs`` runs written, then each moved QUEUED → EXECUTING →
COMPLETED by the same UPDATE the reports make (status, updated_at,
heartbeat_at). Prints the WAL bytes per move (the same on every run: how many
index entries each move writes) and the microseconds per move (one client,
one round trip each: noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import asyncpg

from bench.databases import create_database, drop_database
from db.migrate import upgrade

#: Values for the runs' columns that must be given (NOT NULL, no default).
VALUES = {
    "project_id": "'p1'",
    "task": "'echo'",
    "status": "'QUEUED'",
    "attempt": "1",
    "tags": "'[]'",
    "metadata": "'{}'",
    "max_attempts": "3",
    "step": "0",
    "step_pending": "false",
    "queue": "'echo'",
    "held": "false",
    "gated": "false",
    "priority": "0",
    "created_at": "now()",
    "updated_at": "now()",
    "order_at": "now()",
}


async def moves(url: str, runs: int) -> tuple[float, float]:
    """WAL bytes and microseconds per status move."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql", 1))
    try:
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'"
            " AND is_nullable = 'NO' AND column_default IS NULL AND column_name <> 'id'"
        )
        names = [row["column_name"] for row in columns]
        await conn.execute("ALTER TABLE runs DROP CONSTRAINT IF EXISTS runs_project_id_fkey")
        rows = ",".join(
            "(" + ",".join([f"'run_{i:06d}'", *(VALUES[name] for name in names)]) + ")"
            for i in range(runs)
        )
        await conn.execute(f"INSERT INTO runs (id, {', '.join(names)}) VALUES {rows}")
        await conn.execute("CHECKPOINT")
        start_lsn = await conn.fetchval("SELECT pg_current_wal_lsn()")
        start = time.perf_counter()
        for status in ("EXECUTING", "COMPLETED"):
            for i in range(runs):
                await conn.execute(
                    "UPDATE runs SET status = $1, updated_at = now(), heartbeat_at = now()"
                    " WHERE id = $2",
                    status,
                    f"run_{i:06d}",
                )
        elapsed = time.perf_counter() - start
        wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", start_lsn)
        return int(wal) / (2 * runs), elapsed * 1e6 / (2 * runs)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("revisions", nargs="*", default=["0015", "head"])
    args = parser.parse_args()
    server = os.environ.get("BENCH_DATABASE_URL", "")
    if not server.startswith("postgresql"):
        raise SystemExit("bench.wal: set BENCH_DATABASE_URL to a PostgreSQL server")
    for _ in range(2):
        for revision in args.revisions:
            url = create_database(server)
            try:
                upgrade(url, revision)
                wal, micros = asyncio.run(moves(url, args.runs))
            finally:
                drop_database(server, url)
            print(f"{revision:>6}: {wal:5.0f} WAL bytes per status move, {micros:4.0f} µs each")


if __name__ == "__main__":
    main()
