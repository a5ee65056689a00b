"""spam_lessons: Junk training's queue of lessons for the spam scanner

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 13:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'spam_lessons',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  nullable=False),
        sa.Column('user_address', sa.String(length=320), nullable=False),
        sa.Column('blob_id', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.Column('next_attempt', sa.BigInteger(), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_spam_lessons')),
    )
    op.create_index(op.f('ix_spam_lessons_next_attempt'), 'spam_lessons',
                    ['next_attempt'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_spam_lessons_next_attempt'), table_name='spam_lessons')
    op.drop_table('spam_lessons')
