"""report rollups: one row of additive figures per closed local day, the invalidation counter, and
an index counting customers per stage from the index alone

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 12:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('report_days',
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('starts_at', sa.DateTime(), nullable=False),
    sa.Column('ends_at', sa.DateTime(), nullable=False),
    sa.Column('new_customers', sa.Integer(), nullable=False),
    sa.Column('new_by_channel', sa.JSON(), nullable=False),
    sa.Column('new_by_source', sa.JSON(), nullable=False),
    sa.Column('messages_in', sa.Integer(), nullable=False),
    sa.Column('messages_out', sa.Integer(), nullable=False),
    sa.Column('opt_outs', sa.Integer(), nullable=False),
    sa.Column('stage_moves', sa.JSON(), nullable=False),
    sa.Column('active', sa.LargeBinary(), nullable=False),
    sa.Column('built_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('day'),
    )
    state = op.create_table('report_rollup_state',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    )
    op.bulk_insert(state, [{'id': 1, 'generation': 0}])
    op.create_index('ix_customers_stage_first_seen', 'customers', ['stage', 'first_seen_at'])


def downgrade() -> None:
    op.drop_index('ix_customers_stage_first_seen', 'customers')
    op.drop_table('report_rollup_state')
    op.drop_table('report_days')
