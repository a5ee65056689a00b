"""access_entries: trusted networks, allow- and blocklists

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 12:40:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'access_entries',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('list', sa.String(length=16), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('value', sa.String(length=320), nullable=False),
        sa.Column('note', sa.String(length=255), server_default='', nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_access_entries')),
        sa.UniqueConstraint('list', 'kind', 'value',
                            name=op.f('uq_access_entries_list_kind_value')),
    )


def downgrade() -> None:
    op.drop_table('access_entries')
