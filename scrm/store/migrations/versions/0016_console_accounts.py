"""Console accounts, browser sessions, single-use sign-in links and sign-in failures (throttling)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 09:05:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'staff_accounts',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('name', sa.String(64), nullable=False, unique=True),
        sa.Column('role', sa.String(16), nullable=False),
        sa.Column('password_hash', sa.String(256), nullable=True),
        sa.Column('identity', sa.String(160), nullable=True, unique=True),
        sa.Column('disabled', sa.Boolean(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
    )
    op.create_table(
        'console_sessions',
        sa.Column('id', sa.String(64), primary_key=True),
        sa.Column('account_id', sa.Integer(), sa.ForeignKey('staff_accounts.id'), nullable=False),
        sa.Column('csrf', sa.String(64), nullable=False),
        sa.Column('address', sa.String(64), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(), nullable=False),
        sa.Column('ended_at', sa.DateTime(), nullable=True),
    )
    op.create_index('ix_console_sessions_account_id', 'console_sessions', ['account_id'])
    op.create_table(
        'console_sign_in_links',
        sa.Column('id', sa.String(64), primary_key=True),
        sa.Column('account_id', sa.Integer(), sa.ForeignKey('staff_accounts.id'), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.Column('used_at', sa.DateTime(), nullable=True),
    )
    op.create_index('ix_console_sign_in_links_account_id', 'console_sign_in_links', ['account_id'])
    op.create_table(
        'console_sign_in_failures',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('address', sa.String(64), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
    )
    op.create_index('ix_console_sign_in_failures_name_at', 'console_sign_in_failures', ['name', 'at'])
    op.create_index('ix_console_sign_in_failures_address_at', 'console_sign_in_failures', ['address', 'at'])


def downgrade() -> None:
    op.drop_table('console_sign_in_failures')
    op.drop_table('console_sign_in_links')
    op.drop_table('console_sessions')
    op.drop_table('staff_accounts')
