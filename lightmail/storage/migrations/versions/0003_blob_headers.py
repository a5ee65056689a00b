"""blobs.headers: each message content's header block, for SEARCH/SORT/FETCH

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('headers', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite that copies the table and drops the old one, which
    # with foreign keys on fails as soon as a message refers to a blob (it did, on
    # the fixture tests/test_migrations.py loads).  DROP COLUMN is done in place on
    # SQLite 3.35+, as on the servers.
    op.drop_column('blobs', 'headers')
