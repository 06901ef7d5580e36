"""drop ix_customer_tags_customer_id and ix_tag_scores_customer_id: each table's unique
(customer_id, tag_id) index starts with customer_id and serves the same lookups, so the single-column
indexes only cost writes (every keyword hit at ingest writes both tables) and space

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 11:00:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index('ix_customer_tags_customer_id', table_name='customer_tags')
    op.drop_index('ix_tag_scores_customer_id', table_name='tag_scores')


def downgrade() -> None:
    op.create_index('ix_tag_scores_customer_id', 'tag_scores', ['customer_id'], unique=False)
    op.create_index('ix_customer_tags_customer_id', 'customer_tags', ['customer_id'], unique=False)
