"""The database: SQLModel models, the async engine and Alembic migrations.

Only the gateway writes here (see docs/architecture.md, invariant 2).
"""
