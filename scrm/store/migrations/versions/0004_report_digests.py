"""report digests; indexes for attribution, funnels and coupon reports

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 21:23:17.948379
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

def upgrade() -> None:
    op.create_table('report_digests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('account', sa.String(length=32), nullable=False),
    sa.Column('external_id', sa.String(length=128), nullable=False),
    sa.Column('frequency', sa.String(length=8), nullable=False),
    sa.Column('at', sa.String(length=5), nullable=False),
    sa.Column('locale', sa.String(length=16), nullable=True),
    sa.Column('next_at', sa.DateTime(), nullable=False),
    sa.Column('last_sent_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('channel', 'account', 'external_id', name='uq_report_digests_staff')
    )
    with op.batch_alter_table('report_digests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_report_digests_next_at'), ['next_at'], unique=False)

    with op.batch_alter_table('conversions', schema=None) as batch_op:
        batch_op.create_index('ix_conversions_campaign_created', ['campaign', 'created_at'], unique=False)

    with op.batch_alter_table('coupon_codes', schema=None) as batch_op:
        batch_op.create_index('ix_coupon_codes_granted_at', ['granted_at'], unique=False)

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_deliveries_customer_finished', ['customer_id', 'finished_at'], unique=False)

def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_customer_finished')

    with op.batch_alter_table('coupon_codes', schema=None) as batch_op:
        batch_op.drop_index('ix_coupon_codes_granted_at')

    with op.batch_alter_table('conversions', schema=None) as batch_op:
        batch_op.drop_index('ix_conversions_campaign_created')

    with op.batch_alter_table('report_digests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_report_digests_next_at'))

    op.drop_table('report_digests')
