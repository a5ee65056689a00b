"""queue_messages.folder: the folder a quarantined message is filed in

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 12:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('queue_messages', sa.Column('folder', sa.String(length=512), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        # SQLite (3.35+) drops a column in place; alembic's batch mode would copy the
        # table, and dropping the old copy cascades to every queue_recipients row.
        op.execute('ALTER TABLE queue_messages DROP COLUMN folder')
    else:
        op.drop_column('queue_messages', 'folder')
