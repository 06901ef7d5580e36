"""loyalty: points ledger and accounts, referrals, surveys, follow-up tasks, line items, item pairs

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 10:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('loyalty_accounts',
    sa.Column('customer_id', sa.Integer(), sa.ForeignKey('customers.id'), autoincrement=False, nullable=False),
    sa.Column('balance', sa.Integer(), nullable=False),
    sa.Column('tier', sa.String(length=16), nullable=False),
    sa.Column('tier_at', sa.DateTime(), nullable=True),
    sa.Column('owner', sa.String(length=160), nullable=True),
    sa.Column('referral_code', sa.String(length=16), nullable=True),
    sa.Column('intent_at', sa.DateTime(), nullable=True),
    sa.Column('p_alive', sa.Float(), nullable=True),
    sa.Column('expected_purchases', sa.Float(), nullable=True),
    sa.Column('clv', sa.Float(), nullable=True),
    sa.Column('churn_risk', sa.Float(), nullable=True),
    sa.Column('churn_method', sa.String(length=16), nullable=True),
    sa.Column('scored_at', sa.DateTime(), nullable=True),
    sa.Column('recommendations', sa.JSON(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('customer_id'),
    sa.UniqueConstraint('referral_code'),
    )
    op.create_index('ix_loyalty_accounts_tier', 'loyalty_accounts', ['tier'])
    op.create_index('ix_loyalty_accounts_owner', 'loyalty_accounts', ['owner'])

    op.create_table('points_ledger',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), sa.ForeignKey('customers.id'), nullable=False),
    sa.Column('delta', sa.Integer(), nullable=False),
    sa.Column('reason', sa.String(length=16), nullable=False),
    sa.Column('ref', sa.String(length=64), nullable=True),
    sa.Column('balance_after', sa.Integer(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('customer_id', 'reason', 'ref', name='uq_points_ledger_once'),
    )
    op.create_index('ix_points_ledger_customer_created', 'points_ledger', ['customer_id', 'created_at'])
    op.create_index('ix_points_ledger_expires_at', 'points_ledger', ['expires_at'])

    op.create_table('loyalty_seen_conversions',
    sa.Column('conversion_id', sa.Integer(), sa.ForeignKey('conversions.id'), autoincrement=False, nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('seen_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('conversion_id'),
    )
    op.create_index('ix_loyalty_seen_conversions_customer_id', 'loyalty_seen_conversions', ['customer_id'])

    op.create_table('referrals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('referrer_id', sa.Integer(), sa.ForeignKey('customers.id'), nullable=False),
    sa.Column('referee_id', sa.Integer(), sa.ForeignKey('customers.id'), nullable=False),
    sa.Column('code', sa.String(length=16), nullable=False),
    sa.Column('via', sa.String(length=8), nullable=False),
    sa.Column('captured_at', sa.DateTime(), nullable=False),
    sa.Column('converted_at', sa.DateTime(), nullable=True),
    sa.Column('points_paid', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('referee_id'),
    )
    op.create_index('ix_referrals_referrer_id', 'referrals', ['referrer_id'])

    op.create_table('surveys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), sa.ForeignKey('customers.id'), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('ref', sa.String(length=64), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('account', sa.String(length=32), nullable=False),
    sa.Column('external_id', sa.String(length=128), nullable=False),
    sa.Column('campaign', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('due_at', sa.DateTime(), nullable=False),
    sa.Column('asked_at', sa.DateTime(), nullable=True),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.Column('score', sa.SmallInteger(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('answered_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('customer_id', 'trigger', 'ref', name='uq_surveys_once'),
    )
    op.create_index('ix_surveys_customer_id', 'surveys', ['customer_id'])
    op.create_index('ix_surveys_status_due', 'surveys', ['status', 'due_at'])
    op.create_index('ix_surveys_answered_at', 'surveys', ['answered_at'])

    op.create_table('followup_tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), sa.ForeignKey('customers.id'), nullable=False),
    sa.Column('owner', sa.String(length=160), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('rule_key', sa.String(length=64), nullable=True),
    sa.Column('due_at', sa.DateTime(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=160), nullable=True),
    sa.Column('done_at', sa.DateTime(), nullable=True),
    sa.Column('done_by', sa.String(length=160), nullable=True),
    sa.Column('notified_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('customer_id', 'kind', 'rule_key', name='uq_followup_tasks_rule'),
    )
    op.create_index('ix_followup_tasks_customer_id', 'followup_tasks', ['customer_id'])
    op.create_index('ix_followup_tasks_owner_done', 'followup_tasks', ['owner', 'done_at'])

    op.create_table('followup_digests',
    sa.Column('staff', sa.String(length=160), nullable=False),
    sa.Column('last_date', sa.String(length=10), nullable=False),
    sa.PrimaryKeyConstraint('staff'),
    )

    op.create_table('conversion_items',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('conversion_id', sa.Integer(), sa.ForeignKey('conversions.id'), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('sku', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('quantity', sa.Float(), nullable=False),
    sa.Column('price', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('conversion_id', 'sku', name='uq_conversion_items_sku'),
    )
    op.create_index('ix_conversion_items_conversion_id', 'conversion_items', ['conversion_id'])
    op.create_index('ix_conversion_items_customer_id', 'conversion_items', ['customer_id'])
    op.create_index('ix_conversion_items_sku_customer', 'conversion_items', ['sku', 'customer_id'])

    op.create_table('item_pairs',
    sa.Column('sku_a', sa.String(length=64), nullable=False),
    sa.Column('sku_b', sa.String(length=64), nullable=False),
    sa.Column('together', sa.Integer(), nullable=False),
    sa.Column('support', sa.Float(), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('lift', sa.Float(), nullable=False),
    sa.Column('computed_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('sku_a', 'sku_b'),
    )


def downgrade() -> None:
    for table in ('item_pairs', 'conversion_items', 'followup_digests', 'followup_tasks', 'surveys', 'referrals',
                  'loyalty_seen_conversions', 'points_ledger', 'loyalty_accounts'):
        op.drop_table(table)
