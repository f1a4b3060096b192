"""Planner statistics that keep up with a young database (PostgreSQL).

PostgreSQL plans a prepared statement from the statistics of its tables, and
keeps a generic plan until those statistics change. A fresh database under
load keeps the plans it made while its tables were nearly empty, which read a
table whole (a sequential scan of ``runs`` for every batch of reports, of
``delivery_attempts`` for every batch of callbacks) long after an index would
answer; autovacuum's next ANALYZE, a minute or more away, is what ends that.
:func:`analyze_grown` analyzes a table as soon as it has grown to twice the
size its statistics say (and to ``LEAST_PAGES`` at least), which also has
every plan on it made again; a table that grows no further is left to
autovacuum (docs/performance.md).
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["LEAST_PAGES", "analyze_grown"]

#: A table is analyzed by growth only from this many pages on (256 KB):
#: reading 150 pages whole took 2.5 ms a call (``delivery_attempts`` in a
#: drain), an ANALYZE of a table this small a few ms once.
LEAST_PAGES = 32

_GROWN = sa.text(
    """
    SELECT c.relname
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relkind = 'r'
        AND pg_relation_size(c.oid) / current_setting('block_size')::int
            >= GREATEST(:least, 2 * c.relpages)
    ORDER BY c.relname
    """
)


def analyze_grown(conn: sa.Connection, least: int = LEAST_PAGES) -> list[str]:
    """ANALYZE each table of the schema that has grown to twice its size as
    of its last statistics (``pg_class.relpages``) and to ``least`` pages;
    the tables analyzed. Run it outside a transaction that could roll back."""
    tables = list(conn.execute(_GROWN, {"least": least}).scalars())
    quote = conn.dialect.identifier_preparer.quote
    for table in tables:
        conn.execute(sa.text(f"ANALYZE {quote(table)}"))
    return tables
