"""dmarc_results: per-message DMARC results for aggregate reports

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 00:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'dmarc_results',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                  nullable=False),
        sa.Column('arrived', sa.BigInteger(), nullable=False),
        sa.Column('policy_domain', sa.String(length=255), nullable=False),
        sa.Column('source_ip', sa.String(length=64), nullable=False),
        sa.Column('header_from', sa.String(length=255), nullable=False),
        sa.Column('envelope_from', sa.String(length=255), nullable=False),
        sa.Column('envelope_to', sa.String(length=255), nullable=False),
        sa.Column('disposition', sa.String(length=16), nullable=False),
        sa.Column('dkim', sa.String(length=8), nullable=False),
        sa.Column('spf', sa.String(length=8), nullable=False),
        sa.Column('reasons', sa.Text(), nullable=False),
        sa.Column('dkim_results', sa.Text(), nullable=False),
        sa.Column('spf_domain', sa.String(length=255), nullable=False),
        sa.Column('spf_scope', sa.String(length=8), nullable=False),
        sa.Column('spf_result', sa.String(length=16), nullable=False),
        sa.Column('published', sa.Text(), nullable=False),
        sa.Column('report_id', sa.String(length=64), nullable=True),
        sa.Column('claimed', sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_dmarc_results')),
    )
    with op.batch_alter_table('dmarc_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dmarc_results_report_id'), ['report_id'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_dmarc_results_arrived'), ['arrived'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('dmarc_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dmarc_results_arrived'))
        batch_op.drop_index(batch_op.f('ix_dmarc_results_report_id'))
    op.drop_table('dmarc_results')
