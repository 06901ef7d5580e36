"""campaign engine: occurrences, variants, groups, runs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 21:17:22.109861
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('campaign_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('campaign', sa.String(length=64), nullable=False),
    sa.Column('occurrence', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('scheduled_at', sa.DateTime(), nullable=False),
    sa.Column('ran_at', sa.DateTime(), nullable=False),
    sa.Column('planned', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('campaign', 'occurrence')
    )
    op.create_table('chat_groups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('account', sa.String(length=32), nullable=False),
    sa.Column('external_id', sa.String(length=128), nullable=False),
    sa.Column('title', sa.String(length=255), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('channel', 'account', 'external_id')
    )
    op.create_table('group_members',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('group_id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('joined_at', sa.DateTime(), nullable=False),
    sa.Column('left_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ),
    sa.ForeignKeyConstraint(['group_id'], ['chat_groups.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('group_id', 'customer_id')
    )
    with op.batch_alter_table('group_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_group_members_customer_id'), ['customer_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_group_members_group_id'), ['group_id'], unique=False)

    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('created_at', sa.DateTime(), nullable=True))
    op.execute("UPDATE campaigns SET created_at = updated_at")

    with op.batch_alter_table('coupon_codes', schema=None) as batch_op:
        batch_op.alter_column('code',
               existing_type=sa.VARCHAR(length=32),
               type_=sa.String(length=64),
               existing_nullable=False)
        batch_op.create_index(batch_op.f('ix_coupon_codes_expires_at'), ['expires_at'], unique=False)

    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('birthday_md', sa.String(length=5), nullable=True))
        batch_op.create_index(batch_op.f('ix_customers_birthday_md'), ['birthday_md'], unique=False)

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('target', sa.String(length=24), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('occurrence', sa.String(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('group_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('variant', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('platform_msg_id', sa.String(length=128), nullable=True))
        batch_op.alter_column('customer_id',
               existing_type=sa.INTEGER(),
               nullable=True)
        batch_op.drop_constraint('uq_deliveries_once', type_='unique')
        batch_op.create_unique_constraint('uq_deliveries_once', ['campaign', 'step', 'target', 'occurrence'])
        batch_op.create_foreign_key('fk_deliveries_group', 'chat_groups', ['group_id'], ['id'])
    op.execute("UPDATE deliveries SET target = 'c' || customer_id")



def downgrade() -> None:
    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.drop_column('created_at')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_constraint('fk_deliveries_group', type_='foreignkey')
        batch_op.drop_constraint('uq_deliveries_once', type_='unique')
        batch_op.create_unique_constraint(batch_op.f('uq_deliveries_once'), ['campaign', 'step', 'customer_id'])
        batch_op.alter_column('customer_id',
               existing_type=sa.INTEGER(),
               nullable=False)
        batch_op.drop_column('platform_msg_id')
        batch_op.drop_column('variant')
        batch_op.drop_column('group_id')
        batch_op.drop_column('occurrence')
        batch_op.drop_column('target')

    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_customers_birthday_md'))
        batch_op.drop_column('birthday_md')

    with op.batch_alter_table('coupon_codes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_coupon_codes_expires_at'))
        batch_op.alter_column('code',
               existing_type=sa.String(length=64),
               type_=sa.VARCHAR(length=32),
               existing_nullable=False)

    with op.batch_alter_table('group_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_group_members_group_id'))
        batch_op.drop_index(batch_op.f('ix_group_members_customer_id'))

    op.drop_table('group_members')
    op.drop_table('chat_groups')
    op.drop_table('campaign_runs')
