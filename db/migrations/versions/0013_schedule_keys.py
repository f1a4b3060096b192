"""schedules: an external ID and a deduplication key (Trigger.dev's schedules)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.add_column(sa.Column("external_id", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("deduplication_key", sa.String(length=200), nullable=True))
        batch_op.create_unique_constraint(
            "uq_schedules_deduplication_key", ["project_id", "deduplication_key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("schedules", schema=None) as batch_op:
        batch_op.drop_constraint("uq_schedules_deduplication_key", type_="unique")
        batch_op.drop_column("deduplication_key")
        batch_op.drop_column("external_id")
