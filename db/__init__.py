"""The database: SQLModel models, the async engine and Alembic migrations.

Only the gateway writes here (see DESIGN.md, invariant 2).
"""
