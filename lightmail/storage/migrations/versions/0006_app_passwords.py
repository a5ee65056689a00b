"""app_passwords; users.password_expired, last_login, last_login_from

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'app_passwords',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('secret_hash', sa.String(length=64), nullable=False),
        sa.Column('protocols', sa.String(length=64), server_default='', nullable=False),
        sa.Column('created', sa.BigInteger(), nullable=False),
        sa.Column('last_used', sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'],
                                name=op.f('fk_app_passwords_user_id_users'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_app_passwords')),
        sa.UniqueConstraint('secret_hash', name=op.f('uq_app_passwords_secret_hash')),
        sa.UniqueConstraint('user_id', 'name', name=op.f('uq_app_passwords_user_id_name')),
    )
    # ADD COLUMN is done in place on every backend (no table copy on SQLite).
    op.add_column('users', sa.Column('password_expired', sa.Boolean(),
                                     server_default=sa.false(), nullable=False))
    op.add_column('users', sa.Column('last_login', sa.BigInteger(), nullable=True))
    op.add_column('users', sa.Column('last_login_from', sa.String(length=64),
                                     nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite (3.35+) DROP COLUMN is done in place, where a table
    # copy would drop the users table and, with foreign keys on, cascade to their mail.
    op.drop_column('users', 'last_login_from')
    op.drop_column('users', 'last_login')
    op.drop_column('users', 'password_expired')
    op.drop_table('app_passwords')
