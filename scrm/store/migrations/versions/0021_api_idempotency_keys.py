"""The API's idempotency keys: a POST's Idempotency-Key and its first answer, kept 24 hours

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-05 22:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0021'
down_revision: str | None = '0020'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'api_idempotency_keys',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('key_name', sa.String(32), nullable=False),
        sa.Column('idempotency_key', sa.String(255), nullable=False),
        sa.Column('fingerprint', sa.String(64), nullable=False),
        sa.Column('status', sa.Integer(), nullable=True),
        sa.Column('body', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.UniqueConstraint('key_name', 'idempotency_key', name='uq_api_idempotency_keys_key'),
    )
    op.create_index('ix_api_idempotency_keys_created_at', 'api_idempotency_keys', ['created_at'])


def downgrade() -> None:
    op.drop_index('ix_api_idempotency_keys_created_at', 'api_idempotency_keys')
    op.drop_table('api_idempotency_keys')
