"""Conversations (one per customer and channel account) and the staff member behind a delivery

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 13:45:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0017'
down_revision: str | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'conversations',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('customer_id', sa.Integer(), sa.ForeignKey('customers.id'), nullable=False),
        sa.Column('channel', sa.String(16), nullable=False),
        sa.Column('account', sa.String(32), nullable=False),
        sa.Column('state', sa.String(16), nullable=False),
        sa.Column('assignee', sa.String(160), nullable=True),
        sa.Column('assigned_at', sa.DateTime(), nullable=True),
        sa.Column('handled', sa.Boolean(), nullable=False),
        sa.Column('opened_at', sa.DateTime(), nullable=False),
        sa.Column('waiting_since', sa.DateTime(), nullable=True),
        sa.Column('last_customer_at', sa.DateTime(), nullable=True),
        sa.Column('last_staff_at', sa.DateTime(), nullable=True),
        sa.Column('first_response_at', sa.DateTime(), nullable=True),
        sa.Column('resolved_at', sa.DateTime(), nullable=True),
        sa.Column('resolved_by', sa.String(160), nullable=True),
        sa.Column('alerted_at', sa.DateTime(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('customer_id', 'channel', 'account', name='uq_conversations_customer_account'),
    )
    op.create_index('ix_conversations_state_waiting', 'conversations', ['state', 'waiting_since'])
    op.create_index('ix_conversations_assignee_state', 'conversations', ['assignee', 'state'])
    with op.batch_alter_table('deliveries') as batch:
        batch.add_column(sa.Column('actor', sa.String(160), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deliveries') as batch:
        batch.drop_column('actor')
    op.drop_index('ix_conversations_assignee_state', 'conversations')
    op.drop_index('ix_conversations_state_waiting', 'conversations')
    op.drop_table('conversations')
