"""Tracked links: the short links (/l/<token>) templates write with track(), what each stands for, and
the index their clicks are counted by

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 17:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0019'
down_revision: str | None = '0018'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'tracked_links',
        sa.Column('token', sa.String(64), primary_key=True),
        sa.Column('target', sa.Text(), nullable=False),
        sa.Column('campaign', sa.String(64), nullable=True),
        sa.Column('step', sa.Integer(), nullable=True),
        sa.Column('variant', sa.String(16), nullable=True),
        sa.Column('rule', sa.String(64), nullable=True),
        sa.Column('customer_id', sa.Integer(), sa.ForeignKey('customers.id'), nullable=True),
        sa.Column('delivery_id', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
    )
    op.create_index('ix_tracked_links_customer_id', 'tracked_links', ['customer_id'])
    op.create_index('ix_touchpoints_clicks', 'touchpoints', ['campaign', 'customer_id'], unique=False,
                    sqlite_where=sa.text("kind = 'click'"), postgresql_where=sa.text("kind = 'click'"))


def downgrade() -> None:
    op.drop_index('ix_touchpoints_clicks', table_name='touchpoints')
    op.drop_index('ix_tracked_links_customer_id', 'tracked_links')
    op.drop_table('tracked_links')
