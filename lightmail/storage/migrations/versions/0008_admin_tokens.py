"""admin_tokens: bearer tokens of the admin API

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'admin_tokens',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('scope', sa.String(length=16), nullable=False),
        sa.Column('secret_hash', sa.String(length=64), nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.Column('expires', sa.BigInteger(), nullable=True),
        sa.Column('last_used', sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_tokens')),
        sa.UniqueConstraint('name', name=op.f('uq_admin_tokens_name')),
        sa.UniqueConstraint('secret_hash', name=op.f('uq_admin_tokens_secret_hash')),
    )


def downgrade() -> None:
    op.drop_table('admin_tokens')
