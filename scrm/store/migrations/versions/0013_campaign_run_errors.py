"""campaign_runs.error: why a campaign failed to plan (status 'failed'), so one broken campaign is
visible in `scrm campaigns list` and to staff instead of only in the log

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 09:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('campaign_runs') as batch:
        batch.add_column(sa.Column('error', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('campaign_runs') as batch:
        batch.drop_column('error')
