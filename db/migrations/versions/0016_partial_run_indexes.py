"""runs: the indexes of columns most runs leave empty hold only the runs that fill them

A run's status moves three or four times in its life. On SQLite each move
rewrites the entries of every index that holds ``status``; on PostgreSQL a
move changes indexed columns, so it is never a heap-only update and writes a
new entry into every index of the table. Most runs have no ``run_at``,
``expire_at``, schedule, replay source, batch or parent, yet each was in the
index of each of those. Partial indexes (``… WHERE column IS NOT NULL``) keep
them out; every query of these columns compares them (``run_at <= :now``,
``parent_id = :id``), which both databases know implies ``IS NOT NULL``, so
the same plans use them (docs/performance.md).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: name, columns, unique, the column whose runs it holds
PARTIAL = (
    ("ix_runs_status_run_at", ["status", "run_at"], False, "run_at"),
    ("ix_runs_status_expire_at", ["status", "expire_at"], False, "expire_at"),
    ("ix_runs_schedule_tick", ["schedule_id", "scheduled_at"], True, "schedule_id"),
    ("ix_runs_replayed_from", ["replayed_from"], False, "replayed_from"),
    ("ix_runs_batch_id", ["batch_id"], False, "batch_id"),
    ("ix_runs_parent_id", ["parent_id"], False, "parent_id"),
)


def upgrade() -> None:
    for name, columns, unique, column in PARTIAL:
        op.drop_index(name, table_name="runs")
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(
            name, "runs", columns, unique=unique, sqlite_where=where, postgresql_where=where
        )


def downgrade() -> None:
    for name, columns, unique, _ in PARTIAL:
        op.drop_index(name, table_name="runs")
        op.create_index(name, "runs", columns, unique=unique)
