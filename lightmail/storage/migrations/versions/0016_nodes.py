"""nodes: the nodes sharing the database, their heartbeats and drain requests

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-20 10:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'nodes',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('started', sa.BigInteger(), nullable=False),
        sa.Column('heartbeat', sa.BigInteger(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('drain_requested', sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_nodes')),
    )


def downgrade() -> None:
    op.drop_table('nodes')
