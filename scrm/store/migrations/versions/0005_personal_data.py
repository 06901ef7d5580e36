"""personal data encrypted at rest; consents; append-only audit log

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 21:40:00

Plaintext ``customers.phone`` / ``birthday`` become ciphertext columns. A migration has no key (keys
never live in the store), so existing plaintext values move to ``personal_plaintext_pending`` and are
sealed and deleted by scrm.personal when the service first opens its keyring; SQLite's secure_delete
zeroes freed pages so the plaintext does not linger in the file.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REFUSE = "audit_log is append-only"


def _drop_columns(table: str, *columns: str) -> None:
    """SQLite 3.35+ drops columns in place (ALTER TABLE ... DROP COLUMN); Alembic would copy the table."""
    for column in columns:
        if op.get_bind().dialect.name == "sqlite":
            op.execute(f'ALTER TABLE {table} DROP COLUMN "{column}"')
        else:
            op.drop_column(table, column)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("PRAGMA secure_delete = ON")
    op.create_table('personal_plaintext_pending',
    sa.Column('customer_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('phone', sa.String(length=32), nullable=True),
    sa.Column('birthday', sa.Date(), nullable=True),
    sa.PrimaryKeyConstraint('customer_id')
    )
    op.execute("INSERT INTO personal_plaintext_pending (customer_id, phone, birthday) "
               "SELECT id, phone, birthday FROM customers WHERE phone IS NOT NULL OR birthday IS NOT NULL")
    # Plain ALTERs, not a batch table copy: SQLite cannot drop a table that populated tables reference
    # while foreign keys are enforced (and turning them off is impossible inside the migration's transaction).
    op.add_column('customers', sa.Column('phone_enc', sa.LargeBinary(), nullable=True))
    op.add_column('customers', sa.Column('phone_key', sa.String(length=16), nullable=True))
    op.add_column('customers', sa.Column('phone_hash', sa.String(length=64), nullable=True))
    op.add_column('customers', sa.Column('phone_last4', sa.String(length=4), nullable=True))
    op.add_column('customers', sa.Column('birthday_enc', sa.LargeBinary(), nullable=True))
    op.add_column('customers', sa.Column('birthday_key', sa.String(length=16), nullable=True))
    op.create_index(op.f('ix_customers_phone_hash'), 'customers', ['phone_hash'], unique=False)
    _drop_columns('customers', 'phone', 'birthday')

    op.create_table('privacy_keys',
    sa.Column('key_id', sa.String(length=16), nullable=False),
    sa.Column('check_value', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key_id')
    )
    op.create_table('consents',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.Integer(), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('granted', sa.Boolean(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_consents_customer_channel', 'consents', ['customer_id', 'channel', 'id'], unique=False)
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('actor', sa.String(length=160), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=True),
    sa.Column('via', sa.String(length=64), nullable=True),
    sa.Column('customer_id', sa.Integer(), nullable=True),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_audit_log_at'), 'audit_log', ['at'], unique=False)
    op.create_index(op.f('ix_audit_log_customer_id'), 'audit_log', ['customer_id'], unique=False)
    if sqlite:
        for event in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_log_no_{event.lower()} BEFORE {event} ON audit_log "
                       f"BEGIN SELECT RAISE(ABORT, '{_REFUSE}'); END")
    else:
        op.execute("CREATE FUNCTION audit_log_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN RAISE EXCEPTION '{_REFUSE}'; END $$")
        op.execute("CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
                   "FOR EACH ROW EXECUTE FUNCTION audit_log_refuse()")
        op.execute("CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse()")


def downgrade() -> None:
    """Encrypted values cannot become plaintext here (a migration has no key): phone and birthday
    come back empty; export them first (`scrm customers export`) if they are needed."""
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_refuse()")
    op.drop_index(op.f('ix_audit_log_customer_id'), table_name='audit_log')
    op.drop_index(op.f('ix_audit_log_at'), table_name='audit_log')
    op.drop_table('audit_log')
    op.drop_index('ix_consents_customer_channel', table_name='consents')
    op.drop_table('consents')
    op.drop_table('privacy_keys')
    op.add_column('customers', sa.Column('birthday', sa.Date(), nullable=True))
    op.add_column('customers', sa.Column('phone', sa.String(length=32), nullable=True))
    op.drop_index(op.f('ix_customers_phone_hash'), table_name='customers')
    _drop_columns('customers', 'birthday_key', 'birthday_enc', 'phone_last4', 'phone_hash', 'phone_key', 'phone_enc')
    op.drop_table('personal_plaintext_pending')
