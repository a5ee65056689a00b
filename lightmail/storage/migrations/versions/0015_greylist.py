"""greylist_triplets and greylist_networks: the SQL store of greylisting

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 10:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'greylist_triplets',
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('network', sa.String(length=64), nullable=False),
        sa.Column('sender', sa.String(length=320), nullable=False),
        sa.Column('recipient', sa.String(length=320), nullable=False),
        sa.Column('first_seen', sa.BigInteger(), nullable=False),
        sa.Column('last_seen', sa.BigInteger(), nullable=False),
        sa.Column('passed', sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint('key', name=op.f('pk_greylist_triplets')),
    )
    op.create_index(op.f('ix_greylist_triplets_last_seen'), 'greylist_triplets',
                    ['last_seen'])
    op.create_table(
        'greylist_networks',
        sa.Column('network', sa.String(length=64), nullable=False),
        sa.Column('passes', sa.Integer(), nullable=False),
        sa.Column('last_seen', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('network', name=op.f('pk_greylist_networks')),
    )
    op.create_index(op.f('ix_greylist_networks_last_seen'), 'greylist_networks',
                    ['last_seen'])


def downgrade() -> None:
    op.drop_index(op.f('ix_greylist_networks_last_seen'), table_name='greylist_networks')
    op.drop_table('greylist_networks')
    op.drop_index(op.f('ix_greylist_triplets_last_seen'), table_name='greylist_triplets')
    op.drop_table('greylist_triplets')
