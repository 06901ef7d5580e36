"""ix_touchpoints_staff: (actor, created_at) over staff touchpoints only, to find when a staff member
last wrote (WeChat lets the service message them for 48 hours after); customers' touchpoints have no
actor and are left out of the index, so ingest writes nothing more

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 11:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_touchpoints_staff', 'touchpoints', ['actor', 'created_at'], unique=False,
                    sqlite_where=sa.text('actor IS NOT NULL'), postgresql_where=sa.text('actor IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_touchpoints_staff', table_name='touchpoints')
