"""schedules: runs of a task on a cron clock, one per tick

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import JSONColumn, UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=40), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("payload", JSONColumn, nullable=True),
        sa.Column("options", JSONColumn, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("next_run_at", UTCDateTime(), nullable=True),
        sa.Column("last_run_at", UTCDateTime(), nullable=True),
        sa.Column("last_run_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_schedules_project_created", "schedules", ["project_id", "created_at"], unique=False
    )
    op.create_index(
        "ix_schedules_enabled_next", "schedules", ["enabled", "next_run_at"], unique=False
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("schedule_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("scheduled_at", UTCDateTime(), nullable=True))
    op.create_index("ix_runs_schedule_tick", "runs", ["schedule_id", "scheduled_at"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_runs_schedule_tick", table_name="runs")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("scheduled_at")
        batch_op.drop_column("schedule_id")
    op.drop_index("ix_schedules_enabled_next", table_name="schedules")
    op.drop_index("ix_schedules_project_created", table_name="schedules")
    op.drop_table("schedules")
