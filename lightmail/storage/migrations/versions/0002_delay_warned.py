"""queue_recipients.delay_warned: when the sender was told of a delay

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('delay_warned', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.drop_column('delay_warned')
