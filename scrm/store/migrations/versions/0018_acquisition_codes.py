"""Acquisition codes (渠道活码) and the scans that came through them

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 17:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0018'
down_revision: str | None = '0017'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'acquisition_codes',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('name', sa.String(64), nullable=False, unique=True),
        sa.Column('channel', sa.String(16), nullable=False),
        sa.Column('account', sa.String(32), nullable=False),
        sa.Column('kind', sa.String(16), nullable=False),
        sa.Column('scene', sa.String(64), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('platform_ref', sa.String(128), nullable=True),
        sa.Column('staff', sa.JSON(), nullable=False),
        sa.Column('tags', sa.JSON(), nullable=False),
        sa.Column('welcome', sa.Text(), nullable=True),
        sa.Column('campaign', sa.String(64), nullable=True),
        sa.Column('coupon_pool', sa.String(64), nullable=True),
        sa.Column('cost', sa.Float(), nullable=True),
        sa.Column('expires_at', sa.DateTime(), nullable=True),
        sa.Column('disabled_at', sa.DateTime(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('created_by', sa.String(160), nullable=True),
        sa.UniqueConstraint('channel', 'account', 'scene', name='uq_acquisition_codes_scene'),
    )
    op.create_table(
        'code_scans',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('code_id', sa.Integer(), sa.ForeignKey('acquisition_codes.id'), nullable=False),
        sa.Column('customer_id', sa.Integer(), sa.ForeignKey('customers.id'), nullable=False),
        sa.Column('new_customer', sa.Boolean(), nullable=False),
        sa.Column('scanned_at', sa.DateTime(), nullable=False),
    )
    op.create_index('ix_code_scans_code_scanned', 'code_scans', ['code_id', 'scanned_at'])
    op.create_index('ix_code_scans_customer_scanned', 'code_scans', ['customer_id', 'scanned_at'])


def downgrade() -> None:
    op.drop_index('ix_code_scans_customer_scanned', 'code_scans')
    op.drop_index('ix_code_scans_code_scanned', 'code_scans')
    op.drop_table('code_scans')
    op.drop_table('acquisition_codes')
