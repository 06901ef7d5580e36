"""The inbound journal: events made durable before the platform is answered, applied behind it

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 02:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0022'
down_revision: str | None = '0021'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'inbound_events',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('channel', sa.String(16), nullable=False),
        sa.Column('account', sa.String(32), nullable=False),
        sa.Column('external_id', sa.String(128), nullable=False),
        sa.Column('dedup_key', sa.String(128), nullable=False),
        sa.Column('event', sa.JSON(), nullable=False),
        sa.Column('received_at', sa.DateTime(), nullable=False),
        sa.Column('applied_at', sa.DateTime(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('reaction', sa.JSON(), nullable=True),
        sa.UniqueConstraint('channel', 'account', 'dedup_key', name='uq_inbound_events_dedup'),
    )
    op.create_index('ix_inbound_events_applied_at', 'inbound_events', ['applied_at'])
    op.create_index('ix_inbound_events_unapplied', 'inbound_events', ['id'],
                    sqlite_where=sa.text('applied_at IS NULL'), postgresql_where=sa.text('applied_at IS NULL'))


def downgrade() -> None:
    op.drop_index('ix_inbound_events_unapplied', 'inbound_events')
    op.drop_index('ix_inbound_events_applied_at', 'inbound_events')
    op.drop_table('inbound_events')
