"""users.scram_verifiers: SCRAM's stored keys beside the argon2 hash

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # ADD COLUMN is done in place on every backend (no table copy on SQLite).
    op.add_column('users', sa.Column('scram_verifiers', sa.String(length=1024),
                                     nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite (3.35+) this too is done in place, where a table copy
    # would drop the users table and, with foreign keys on, cascade to their mail.
    op.drop_column('users', 'scram_verifiers')
