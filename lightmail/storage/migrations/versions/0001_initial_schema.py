"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-23 00:12:19.072350
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('blobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('refcount', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.Column('unreferenced_since', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_blobs'))
    )
    with op.batch_alter_table('blobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_blobs_refcount'), ['refcount'], unique=False)

    op.create_table('domains',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_domains')),
    sa.UniqueConstraint('name', name=op.f('uq_domains_name'))
    )
    op.create_table('aliases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('domain_id', sa.Integer(), nullable=False),
    sa.Column('localpart', sa.String(length=255), nullable=False),
    sa.Column('destination', sa.String(length=320), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['domain_id'], ['domains.id'], name=op.f('fk_aliases_domain_id_domains'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aliases')),
    sa.UniqueConstraint('domain_id', 'localpart', 'destination', name=op.f('uq_aliases_domain_id_localpart_destination'))
    )
    op.create_table('queue_messages',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('blob_id', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('mail_from', sa.String(length=320), nullable=False),
    sa.Column('envid', sa.String(length=100), nullable=True),
    sa.Column('ret', sa.String(length=4), nullable=True),
    sa.Column('body', sa.String(length=16), nullable=True),
    sa.Column('smtputf8', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('auth_user', sa.String(length=320), nullable=True),
    sa.Column('client_address', sa.String(length=64), nullable=True),
    sa.Column('priority', sa.Integer(), server_default='0', nullable=False),
    sa.Column('received', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], name=op.f('fk_queue_messages_blob_id_blobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_messages'))
    )
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('domain_id', sa.Integer(), nullable=False),
    sa.Column('localpart', sa.String(length=255), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=True),
    sa.Column('quota_bytes', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('enabled', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['domain_id'], ['domains.id'], name=op.f('fk_users_domain_id_domains'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('domain_id', 'localpart', name=op.f('uq_users_domain_id_localpart'))
    )
    op.create_table('mailboxes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=512), nullable=False),
    sa.Column('uidvalidity', sa.BigInteger(), nullable=False),
    sa.Column('uidnext', sa.BigInteger(), server_default='1', nullable=False),
    sa.Column('highestmodseq', sa.BigInteger(), server_default='1', nullable=False),
    sa.Column('special_use', sa.String(length=32), nullable=True),
    sa.Column('subscribed', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('created', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_mailboxes_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mailboxes')),
    sa.UniqueConstraint('user_id', 'name', name=op.f('uq_mailboxes_user_id_name'))
    )
    op.create_table('queue_recipients',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('queue_id', sa.String(length=32), nullable=False),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('orcpt', sa.String(length=500), nullable=True),
    sa.Column('notify', sa.String(length=32), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('transport', sa.String(length=16), nullable=False),
    sa.Column('next_attempt', sa.BigInteger(), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_until', sa.BigInteger(), nullable=True),
    sa.Column('finished', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['queue_id'], ['queue_messages.id'], name=op.f('fk_queue_recipients_queue_id_queue_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_recipients'))
    )
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_queue_recipients_queue_id'), ['queue_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_queue_recipients_state_next_attempt'), ['state', 'next_attempt'], unique=False)

    op.create_table('expunged',
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('uid', sa.BigInteger(), nullable=False),
    sa.Column('modseq', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_expunged_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('mailbox_id', 'uid', name=op.f('pk_expunged'))
    )
    op.create_table('messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('mailbox_id', sa.Integer(), nullable=False),
    sa.Column('uid', sa.BigInteger(), nullable=False),
    sa.Column('modseq', sa.BigInteger(), nullable=False),
    sa.Column('blob_id', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('internal_date', sa.BigInteger(), nullable=False),
    sa.Column('flags', sa.Text(), server_default='', nullable=False),
    sa.Column('envelope', sa.Text(), nullable=True),
    sa.Column('bodystructure', sa.Text(), nullable=True),
    sa.Column('headers', sa.Text(), nullable=True),
    sa.Column('delivery_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], name=op.f('fk_messages_blob_id_blobs')),
    sa.ForeignKeyConstraint(['mailbox_id'], ['mailboxes.id'], name=op.f('fk_messages_mailbox_id_mailboxes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('mailbox_id', 'delivery_id', name=op.f('uq_messages_mailbox_id_delivery_id')),
    sa.UniqueConstraint('mailbox_id', 'uid', name=op.f('uq_messages_mailbox_id_uid'))
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_mailbox_id_modseq'), ['mailbox_id', 'modseq'], unique=False)




def downgrade() -> None:
    # Dropping a table drops its indexes; MariaDB refuses to drop an index that a
    # foreign key needs, so only tables are dropped, children first.
    op.drop_table('messages')
    op.drop_table('expunged')
    op.drop_table('queue_recipients')
    op.drop_table('mailboxes')
    op.drop_table('users')
    op.drop_table('queue_messages')
    op.drop_table('aliases')
    op.drop_table('domains')
    op.drop_table('blobs')
