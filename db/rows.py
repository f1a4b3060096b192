"""One project's row of a table, or the caller's "not found".

Every resource belongs to a project, and another project's row must look
exactly like a missing one (docs/architecture.md, invariant 7), so
every lookup by ID goes through :func:`owned_row`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

__all__ = ["owned_row"]


def owned_row(
    conn: sa.Connection,
    table: sa.Table,
    row_id: str,
    project_id: str | None,
    missing: Exception,
    *,
    where: tuple[sa.ColumnElement[bool], ...] = (),
    for_update: bool = False,
) -> dict[str, Any]:
    """The row of ``table`` with ``row_id`` in project ``project_id`` (any
    project when ``None``: the signed-URL paths, which carry no key).

    :param missing: raised when there is no such row in the project
    :param where: further conditions (a soft delete, say)
    :param for_update: lock the row for the rest of the transaction
    """
    conditions = [table.c.id == row_id, *where]
    if project_id is not None:
        conditions.append(table.c.project_id == project_id)
    query = sa.select(table).where(*conditions)
    if for_update:
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    if row is None:
        raise missing
    return dict(row)
