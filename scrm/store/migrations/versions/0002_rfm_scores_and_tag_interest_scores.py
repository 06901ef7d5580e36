"""rfm scores and tag interest scores

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 20:58:02.798651
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('tag_scores',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('tag_id', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ),
    sa.ForeignKeyConstraint(['tag_id'], ['tags.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('customer_id', 'tag_id')
    )
    with op.batch_alter_table('tag_scores', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tag_scores_customer_id'), ['customer_id'], unique=False)

    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rfm_r', sa.SmallInteger(), nullable=True))
        batch_op.add_column(sa.Column('rfm_f', sa.SmallInteger(), nullable=True))
        batch_op.add_column(sa.Column('rfm_m', sa.SmallInteger(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.drop_column('rfm_m')
        batch_op.drop_column('rfm_f')
        batch_op.drop_column('rfm_r')

    with op.batch_alter_table('tag_scores', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tag_scores_customer_id'))

    op.drop_table('tag_scores')
