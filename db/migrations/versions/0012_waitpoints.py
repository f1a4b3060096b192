"""waitpoints: what a workflow's wait and delay nodes (or an API client) wait for

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import JSONColumn, UTCDateTime

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "waitpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("output", JSONColumn, nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("tags", JSONColumn, nullable=False),
        sa.Column("timeout_at", UTCDateTime(), nullable=True),
        sa.Column("run_id", sa.String(length=40), nullable=True),
        sa.Column("node_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project_id", "idempotency_key", name="uq_waitpoints_key"),
    )
    op.create_index(
        "ix_waitpoints_status_timeout", "waitpoints", ["status", "timeout_at"], unique=False
    )
    op.create_index(op.f("ix_waitpoints_run_id"), "waitpoints", ["run_id"], unique=False)
    with op.batch_alter_table("run_nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("waitpoint_id", sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_nodes", schema=None) as batch_op:
        batch_op.drop_column("waitpoint_id")
    op.drop_index(op.f("ix_waitpoints_run_id"), table_name="waitpoints")
    op.drop_index("ix_waitpoints_status_timeout", table_name="waitpoints")
    op.drop_table("waitpoints")
