"""queue_messages.requiretls (RFC 8689) and mta_sts_policies (RFC 8461 §5 cache)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-09 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


# Not batch_alter_table: on SQLite that copies queue_messages to a new table and drops
# the old one, and the drop cascades (foreign keys are on) to every queue_recipients
# row.  ALTER TABLE ADD/DROP COLUMN does it in place on every backend (SQLite 3.35+).


def upgrade() -> None:
    op.add_column('queue_messages', sa.Column('requiretls', sa.Boolean(),
                                              server_default=sa.false(), nullable=False))
    op.create_table(
        'mta_sts_policies',
        sa.Column('domain', sa.String(length=255), nullable=False),
        sa.Column('policy_id', sa.String(length=64), nullable=False),
        sa.Column('mode', sa.String(length=16), nullable=False),
        sa.Column('mx', sa.Text(), nullable=False),
        sa.Column('max_age', sa.BigInteger(), nullable=False),
        sa.Column('fetched', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('domain', name=op.f('pk_mta_sts_policies')),
    )


def downgrade() -> None:
    op.drop_table('mta_sts_policies')
    op.drop_column('queue_messages', 'requiretls')
