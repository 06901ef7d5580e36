"""drop ix_customers_stage: ix_customers_stage_first_seen (stage, first_seen_at), added in 0008,
serves every lookup by stage, so the single-column index only cost writes and space

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 04:30:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain DROP INDEX on both stores (no batch table copy of `customers` on SQLite).
    op.drop_index('ix_customers_stage', table_name='customers')


def downgrade() -> None:
    op.create_index('ix_customers_stage', 'customers', ['stage'], unique=False)
