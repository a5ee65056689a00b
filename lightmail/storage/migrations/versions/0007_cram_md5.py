"""users.cram_md5: CRAM-MD5's secret, for sites that enable the mechanism

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('users', sa.Column('cram_md5', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # In place on SQLite 3.35+ (no table copy, which would cascade to the users' mail).
    op.drop_column('users', 'cram_md5')
