"""tlsrpt_results: the outbound MTA's TLS outcomes for TLS-RPT reports (RFC 8460)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-10 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'tlsrpt_results',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('result_key', sa.String(length=64), nullable=False),
        sa.Column('day', sa.String(length=10), nullable=False),
        sa.Column('policy_domain', sa.String(length=255), nullable=False),
        sa.Column('policy_type', sa.String(length=16), nullable=False),
        sa.Column('policy_strings', sa.Text(), nullable=False),
        sa.Column('mx_hosts', sa.Text(), nullable=False),
        sa.Column('result_type', sa.String(length=40), nullable=False),
        sa.Column('sending_ip', sa.String(length=64), nullable=False, server_default=''),
        sa.Column('receiving_mx', sa.String(length=255), nullable=False, server_default=''),
        sa.Column('receiving_ip', sa.String(length=64), nullable=False, server_default=''),
        sa.Column('reason', sa.String(length=255), nullable=False, server_default=''),
        sa.Column('count', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tlsrpt_results')),
        sa.UniqueConstraint('result_key', name=op.f('uq_tlsrpt_results_result_key')),
    )
    op.create_index(op.f('ix_tlsrpt_results_day_policy_domain'), 'tlsrpt_results',
                    ['day', 'policy_domain'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_tlsrpt_results_day_policy_domain'), table_name='tlsrpt_results')
    op.drop_table('tlsrpt_results')
