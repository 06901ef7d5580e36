"""deliveries.unreachable_since: when a send of the delivery first found its platform unreachable, so
that it is tried again until [delivery] unreachable_retry_hours later instead of failing after five tries

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 09:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column without a default: a plain ALTER TABLE on both stores (no batch copy of the
    # outbox on SQLite).
    op.add_column('deliveries', sa.Column('unreachable_since', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deliveries') as batch:
        batch.drop_column('unreachable_since')
