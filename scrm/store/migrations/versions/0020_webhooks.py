"""Outbound webhooks: subscriptions, their outbox (written with the change an event tells of) and the
delivery log

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 22:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0020'
down_revision: str | None = '0019'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'webhook_subscriptions',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('name', sa.String(64), nullable=False, unique=True),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('secret', sa.String(128), nullable=False),
        sa.Column('events', sa.JSON(), nullable=False),
        sa.Column('source', sa.String(8), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('failing_since', sa.DateTime(), nullable=True),
        sa.Column('disabled_at', sa.DateTime(), nullable=True),
        sa.Column('disabled_reason', sa.String(255), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
    )
    op.create_table(
        'webhook_deliveries',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('subscription_id', sa.Integer(), sa.ForeignKey('webhook_subscriptions.id'), nullable=False),
        sa.Column('event_id', sa.String(64), nullable=False),
        sa.Column('kind', sa.String(32), nullable=False),
        sa.Column('customer_id', sa.Integer(), nullable=True),
        sa.Column('payload', sa.JSON(), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.String(255), nullable=True),
        sa.Column('claimed_by', sa.String(64), nullable=True),
        sa.Column('claimed_at', sa.DateTime(), nullable=True),
        sa.Column('due_at', sa.DateTime(), nullable=False),
        sa.Column('retry_until', sa.DateTime(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
    )
    op.create_index('ix_webhook_deliveries_status_due', 'webhook_deliveries', ['status', 'due_at'])
    op.create_index('ix_webhook_deliveries_order', 'webhook_deliveries', ['subscription_id', 'customer_id', 'id'])
    op.create_index('ix_webhook_deliveries_subscription_created', 'webhook_deliveries',
                    ['subscription_id', 'created_at'])
    op.create_table(
        'webhook_attempts',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('delivery_id', sa.Integer(), nullable=False),
        sa.Column('subscription_id', sa.Integer(), sa.ForeignKey('webhook_subscriptions.id'), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('http_status', sa.Integer(), nullable=True),
        sa.Column('latency_ms', sa.Float(), nullable=False),
        sa.Column('error', sa.String(255), nullable=True),
    )
    op.create_index('ix_webhook_attempts_delivery_id', 'webhook_attempts', ['delivery_id'])
    op.create_index('ix_webhook_attempts_subscription_at', 'webhook_attempts', ['subscription_id', 'at'])


def downgrade() -> None:
    op.drop_index('ix_webhook_attempts_subscription_at', 'webhook_attempts')
    op.drop_index('ix_webhook_attempts_delivery_id', 'webhook_attempts')
    op.drop_table('webhook_attempts')
    op.drop_index('ix_webhook_deliveries_subscription_created', 'webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_order', 'webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_status_due', 'webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_table('webhook_subscriptions')
