"""touchpoints.reply_to: on a reply, the platform id of the message it answers, and
ix_touchpoints_reply_to (channel, account, reply_to) over replies only; a retry of that message
(WeChat's, when its passive reply was lost) is answered with the recorded reply again

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 09:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('touchpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reply_to', sa.String(length=128), nullable=True))
    op.create_index('ix_touchpoints_reply_to', 'touchpoints', ['channel', 'account', 'reply_to'], unique=False,
                    sqlite_where=sa.text('reply_to IS NOT NULL'), postgresql_where=sa.text('reply_to IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_touchpoints_reply_to', table_name='touchpoints')
    with op.batch_alter_table('touchpoints', schema=None) as batch_op:
        batch_op.drop_column('reply_to')
