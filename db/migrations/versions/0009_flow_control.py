"""flow control: queues with limits, concurrency keys, priority, debounce, bulk actions

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import JSONColumn, UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DEBOUNCE_WHERE = sa.text("status = 'DELAYED' AND debounce_key IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "queues",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("concurrency_limit", sa.Integer(), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "name", name="uq_queues_project_name"),
    )
    op.create_table(
        "bulk_actions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=40), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("selection", JSONColumn, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("processed", sa.Integer(), nullable=False),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("cursor", sa.String(length=40), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_bulk_actions_status_updated", "bulk_actions", ["status", "updated_at"], unique=False
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("queue", sa.String(length=100), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("concurrency_key", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("order_at", UTCDateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("gated", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("debounce_key", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("debounce_until", UTCDateTime(), nullable=True))
    # Every run so far is in its task's own queue, in the order it was made.
    op.execute("UPDATE runs SET queue = task, order_at = created_at")
    op.create_index(
        "ix_runs_queue", "runs", ["project_id", "queue", "status", "held", "order_at"], unique=False
    )
    op.create_index(
        "ix_runs_debounce",
        "runs",
        ["project_id", "task", "debounce_key"],
        unique=True,
        sqlite_where=_DEBOUNCE_WHERE,
        postgresql_where=_DEBOUNCE_WHERE,
    )


def downgrade() -> None:
    op.drop_index("ix_runs_debounce", table_name="runs")
    op.drop_index("ix_runs_queue", table_name="runs")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for column in (
            "debounce_until",
            "debounce_key",
            "held",
            "gated",
            "order_at",
            "priority",
            "concurrency_key",
            "queue",
        ):
            batch_op.drop_column(column)
    op.drop_index("ix_bulk_actions_status_updated", table_name="bulk_actions")
    op.drop_table("bulk_actions")
    op.drop_table("queues")
