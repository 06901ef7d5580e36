"""ix_coupon_codes_unassigned: (coupon_id, id) over codes not yet given out; a grant looked for the
pool's oldest unassigned code through the coupon_id index, reading every code the pool had granted

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28 11:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_coupon_codes_unassigned', 'coupon_codes', ['coupon_id', 'id'], unique=False,
                    sqlite_where=sa.text('customer_id IS NULL'), postgresql_where=sa.text('customer_id IS NULL'))


def downgrade() -> None:
    op.drop_index('ix_coupon_codes_unassigned', table_name='coupon_codes')
