"""The SQL schema of LightMail's metadata, as SQLAlchemy Core tables.

The tables here are the reference; Alembic migrations under ``migrations/versions``
create them, and ``tests/test_migrations.py`` checks that the migrated database and
these definitions agree on every backend.

Message content is never stored here: ``blobs`` names immutable files in the blob
store by SHA-256, and messages and queued mail refer to them by that id.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

# Lengths: MariaDB needs VARCHAR lengths for indexed text; 255 fits domain names and
# local parts (RFC 5321 §4.5.3.1: 64-octet local part, 255-octet domain).
NAME = sa.String(255)
ADDRESS = sa.String(320)
BLOB_ID = sa.String(64)          # hex SHA-256
TIMESTAMP = sa.BigInteger        # milliseconds since the epoch, UTC: portable and sortable

domains = sa.Table(
    "domains", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", NAME, nullable=False, unique=True),   # lower-case A-label
    sa.Column("created", TIMESTAMP, nullable=False),
)

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("domain_id", sa.Integer, sa.ForeignKey("domains.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("localpart", NAME, nullable=False),            # lower-case
    sa.Column("password_hash", sa.String(255), nullable=True),  # argon2id PHC string
    # SCRAM's stored keys, one per algorithm (directory/scram.py); NULL until the
    # password is set or next used.
    sa.Column("scram_verifiers", sa.String(1024), nullable=True),
    # CRAM-MD5's secret (directory/crammd5.py), kept only while the mechanism is on.
    sa.Column("cram_md5", sa.String(64), nullable=True),
    # The password works no more (lightmail user expire) until a new one is set: a
    # login with it gets IMAP's [EXPIRED] (RFC 5530).  App passwords still work.
    sa.Column("password_expired", sa.Boolean, nullable=False, server_default=sa.false()),
    # The last successful login: when, from where, over what (at most once a minute).
    sa.Column("last_login", TIMESTAMP, nullable=True),
    sa.Column("last_login_from", sa.String(64), nullable=True),
    sa.Column("quota_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created", TIMESTAMP, nullable=False),
    sa.UniqueConstraint("domain_id", "localpart"),
)

# App passwords: random, named, per user, each for some protocols (or all), revocable.
# Only their SHA-256 is kept: they are long random strings (about 100 bits), so a fast
# hash is as good as argon2 against guessing, and a login finds one by it directly.
app_passwords = sa.Table(
    "app_passwords", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", NAME, nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("protocols", sa.String(64), nullable=False, server_default=""),  # "" = all
    sa.Column("created", TIMESTAMP, nullable=False),
    sa.Column("last_used", TIMESTAMP, nullable=True),
    sa.UniqueConstraint("user_id", "name"),
)

# Bearer tokens of the admin API (lightmail token add): random, named, read or write,
# perhaps expiring.  Only their SHA-256 is kept, as for app passwords.
admin_tokens = sa.Table(
    "admin_tokens", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", NAME, nullable=False, unique=True),
    sa.Column("scope", sa.String(16), nullable=False),              # read, write
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created", TIMESTAMP, nullable=False),
    sa.Column("expires", TIMESTAMP, nullable=True),                 # NULL: never
    sa.Column("last_used", TIMESTAMP, nullable=True),
)

# An alias maps localpart@domain to one destination address; several rows with the
# same source expand to several destinations.  localpart '*' is the catch-all.
aliases = sa.Table(
    "aliases", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("domain_id", sa.Integer, sa.ForeignKey("domains.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("localpart", NAME, nullable=False),
    sa.Column("destination", ADDRESS, nullable=False),
    sa.Column("created", TIMESTAMP, nullable=False),
    sa.UniqueConstraint("domain_id", "localpart", "destination"),
)

mailboxes = sa.Table(
    "mailboxes", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.String(512), nullable=False),       # UTF-8, '/' separated
    sa.Column("uidvalidity", sa.BigInteger, nullable=False),
    sa.Column("uidnext", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("highestmodseq", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("special_use", sa.String(32), nullable=True),  # RFC 6154, e.g. '\\Sent'
    sa.Column("subscribed", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created", TIMESTAMP, nullable=False),
    sa.UniqueConstraint("user_id", "name"),
)

# Subscriptions to names that have no mailbox.  RFC 9051 §6.3.7: a subscription is to
# a name, and DELETE does not remove it; LIST (SUBSCRIBED) shows it \NonExistent.  A
# mailbox's own subscription is ``mailboxes.subscribed``: a subscribed name moves here
# when its mailbox is deleted, and back when a mailbox of that name is made again.
subscriptions = sa.Table(
    "subscriptions", metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("name", sa.String(512), primary_key=True),
)

blobs = sa.Table(
    "blobs", metadata,
    sa.Column("id", BLOB_ID, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    # Count of messages and queue entries that refer to this blob.  At zero the
    # blob is garbage once it is older than the configured grace period.
    sa.Column("refcount", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created", TIMESTAMP, nullable=False),
    sa.Column("unreferenced_since", TIMESTAMP, nullable=True),
    # The message's top-level header block (blobs.header_block), kept once per
    # content however many mailboxes file it, for SEARCH/SORT/FETCH of header
    # fields without a blob read.  NULL: not known yet (filled on first need);
    # empty: longer than blobs.HEADER_CAP, read the blob.
    sa.Column("headers", sa.LargeBinary, nullable=True),
    sa.Index(None, "refcount"),
)

messages = sa.Table(
    "messages", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("mailbox_id", sa.Integer, sa.ForeignKey("mailboxes.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("uid", sa.BigInteger, nullable=False),
    sa.Column("modseq", sa.BigInteger, nullable=False),
    sa.Column("blob_id", BLOB_ID, sa.ForeignKey("blobs.id"), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("internal_date", TIMESTAMP, nullable=False),
    sa.Column("flags", sa.Text, nullable=False, server_default=""),  # space-separated
    # Parsed caches (JSON text) so that FETCH ENVELOPE/BODYSTRUCTURE need no blob read.
    sa.Column("envelope", sa.Text, nullable=True),
    sa.Column("bodystructure", sa.Text, nullable=True),
    sa.Column("headers", sa.Text, nullable=True),
    # The queue recipient that delivered this message, for idempotent delivery.
    sa.Column("delivery_id", sa.String(64), nullable=True),
    sa.UniqueConstraint("mailbox_id", "uid"),
    sa.UniqueConstraint("mailbox_id", "delivery_id"),
    sa.Index(None, "mailbox_id", "modseq"),
)

# Expunged UIDs with the MODSEQ of their expunge, for QRESYNC (RFC 7162 §3.2.10).
expunged = sa.Table(
    "expunged", metadata,
    sa.Column("mailbox_id", sa.Integer, sa.ForeignKey("mailboxes.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("uid", sa.BigInteger, primary_key=True),
    sa.Column("modseq", sa.BigInteger, nullable=False),
)

queue_messages = sa.Table(
    "queue_messages", metadata,
    sa.Column("id", sa.String(32), primary_key=True),        # the queue id in logs
    sa.Column("blob_id", BLOB_ID, sa.ForeignKey("blobs.id"), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mail_from", ADDRESS, nullable=False),         # '' is the null sender
    sa.Column("envid", sa.String(100), nullable=True),       # RFC 3461 ENVID
    sa.Column("ret", sa.String(4), nullable=True),           # RFC 3461 RET=FULL|HDRS
    sa.Column("body", sa.String(16), nullable=True),         # 7BIT, 8BITMIME, BINARYMIME
    sa.Column("smtputf8", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("source", sa.String(16), nullable=False),      # mx, submission, lmtp, local
    sa.Column("auth_user", ADDRESS, nullable=True),
    sa.Column("client_address", sa.String(64), nullable=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("received", TIMESTAMP, nullable=False),
    # Local recipients get it in this folder (a quarantine: "Junk"); NULL: as addressed.
    sa.Column("folder", sa.String(512), nullable=True),
    # MAIL FROM ... REQUIRETLS (RFC 8689): relayed only over verified TLS.
    sa.Column("requiretls", sa.Boolean, nullable=False, server_default=sa.false()),
)

queue_recipients = sa.Table(
    "queue_recipients", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("queue_id", sa.String(32),
              sa.ForeignKey("queue_messages.id", ondelete="CASCADE"), nullable=False),
    sa.Column("recipient", ADDRESS, nullable=False),
    sa.Column("orcpt", sa.String(500), nullable=True),       # RFC 3461 ORCPT
    sa.Column("notify", sa.String(32), nullable=True),       # NEVER or SUCCESS,FAILURE,DELAY
    # queued, active, deferred, delivered, bounced, held
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("transport", sa.String(16), nullable=False),   # local, smtp, lmtp
    sa.Column("next_attempt", TIMESTAMP, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_until", TIMESTAMP, nullable=True),
    sa.Column("finished", TIMESTAMP, nullable=True),
    # When the sender was warned that this recipient is delayed (RFC 3464 "delayed",
    # [outbound] delay_warning_time); NULL: not yet.  At most one warning each.
    sa.Column("delay_warned", TIMESTAMP, nullable=True),
    sa.Index(None, "state", "next_attempt"),
    sa.Index(None, "queue_id"),
)

# MTA-STS policies fetched (RFC 8461 §5): kept across restarts, so that a domain's
# enforce policy holds while its policy server is down.  ``mx``: the patterns, one a
# line; ``fetched``: when (ms); the policy is good until fetched + max_age seconds.
mta_sts_policies = sa.Table(
    "mta_sts_policies", metadata,
    sa.Column("domain", NAME, primary_key=True),              # lower-case
    sa.Column("policy_id", sa.String(64), nullable=False),    # the TXT record's id
    sa.Column("mode", sa.String(16), nullable=False),         # enforce, testing, none
    sa.Column("mx", sa.Text, nullable=False),
    sa.Column("max_age", sa.BigInteger, nullable=False),      # seconds
    sa.Column("fetched", TIMESTAMP, nullable=False),
)

# Access lists (lightmail/policy/access.py): trusted networks, allow- and blocklists.
access_entries = sa.Table(
    "access_entries", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("list", sa.String(16), nullable=False),        # trusted, allow, block
    sa.Column("kind", sa.String(16), nullable=False),        # client, sender, recipient
    sa.Column("value", ADDRESS, nullable=False),             # CIDR, address or domain
    sa.Column("note", sa.String(255), nullable=False, server_default=""),
    sa.Column("created", TIMESTAMP, nullable=False),
    sa.UniqueConstraint("list", "kind", "value"),
)

# Junk training (lightmail.policy.training): a message a user filed into Junk (spam)
# or out of it (ham) over IMAP, to be taught to the spam scanner; deleted once taught.
# No foreign key to blobs: the message may be expunged and its blob collected before
# the lesson is sent (it is then dropped).
spam_lessons = sa.Table(
    "spam_lessons", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("user_address", ADDRESS, nullable=False),
    sa.Column("blob_id", BLOB_ID, nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),         # spam or ham
    sa.Column("created", TIMESTAMP, nullable=False),
    sa.Column("next_attempt", TIMESTAMP, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Index(None, "next_attempt"),
)

# Greylisting (lightmail/policy/greylist): one row per (client network, sender,
# recipient) triplet, keyed by the SHA-256 of the three (MariaDB cannot index two
# 320-character addresses in one key); and the count of retries that passed per
# client network, for auto-allowing it.
greylist_triplets = sa.Table(
    "greylist_triplets", metadata,
    sa.Column("key", sa.String(64), primary_key=True),       # hex SHA-256
    sa.Column("network", sa.String(64), nullable=False),     # the client's /24 or /64
    sa.Column("sender", ADDRESS, nullable=False),            # "" for the null sender
    sa.Column("recipient", ADDRESS, nullable=False),
    sa.Column("first_seen", TIMESTAMP, nullable=False),
    sa.Column("last_seen", TIMESTAMP, nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index(None, "last_seen"),
)

greylist_networks = sa.Table(
    "greylist_networks", metadata,
    sa.Column("network", sa.String(64), primary_key=True),
    sa.Column("passes", sa.Integer, nullable=False),
    sa.Column("last_seen", TIMESTAMP, nullable=False),
    sa.Index(None, "last_seen"),
)

QUEUE_STATES = ("queued", "active", "deferred", "delivered", "bounced", "held")

# The nodes sharing this database (lightmail/cluster/membership.py): one row per node
# id, written by the run of it that holds the id (host and pid), its heartbeat every
# [cluster] heartbeat.  ``id`` is what the queue's lease_owner holds.
# ``drain_requested``: when `lightmail node drain` asked it to drain (NULL: never).
nodes = sa.Table(
    "nodes", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("host", NAME, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started", TIMESTAMP, nullable=False),
    sa.Column("heartbeat", TIMESTAMP, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),     # NODE_STATES
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("drain_requested", TIMESTAMP, nullable=True),
)

NODE_STATES = ("running", "draining", "stopped", "dead")

# TLS-RPT (RFC 8460, lightmail/tlsrpt/): the outbound MTA's TLS outcomes, one row per
# day (UTC, YYYY-MM-DD), policy domain, policy, result type, sending address and
# receiving MX, counted.  ``result_key`` is the SHA-256 of all of those (a unique index
# over the columns themselves would pass MariaDB's key size); the policy's strings and
# MX patterns are JSON arrays.  The daily report job deletes a day's rows once reported.
tlsrpt_results = sa.Table(
    "tlsrpt_results", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("result_key", sa.String(64), nullable=False, unique=True),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("policy_domain", NAME, nullable=False),
    sa.Column("policy_type", sa.String(16), nullable=False),   # sts, tlsa, no-policy-found
    sa.Column("policy_strings", sa.Text, nullable=False),
    sa.Column("mx_hosts", sa.Text, nullable=False),
    sa.Column("result_type", sa.String(40), nullable=False),   # success, or RFC 8460's
    sa.Column("sending_ip", sa.String(64), nullable=False, server_default=""),
    sa.Column("receiving_mx", NAME, nullable=False, server_default=""),
    sa.Column("receiving_ip", sa.String(64), nullable=False, server_default=""),
    sa.Column("reason", sa.String(255), nullable=False, server_default=""),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Index(None, "day", "policy_domain"),
)

# DMARC aggregate reports (RFC 7489 §7.2): one row per message whose policy domain
# asks for reports (lightmail/policy/dmarc/reports.py), kept until the next report
# run sends it (then deleted).  A run claims its rows first (report_id, claimed), so
# that two nodes sharing the database never report a message twice; a claim older
# than an hour (a run that died) may be taken again.
dmarc_results = sa.Table(
    "dmarc_results", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("arrived", TIMESTAMP, nullable=False),
    sa.Column("policy_domain", NAME, nullable=False),
    sa.Column("source_ip", sa.String(64), nullable=False),
    sa.Column("header_from", NAME, nullable=False),
    sa.Column("envelope_from", NAME, nullable=False),        # domain; '' null sender
    sa.Column("envelope_to", NAME, nullable=False),          # domain; '' unknown
    # policy_evaluated: disposition (none, quarantine, reject); dkim, spf (pass, fail)
    sa.Column("disposition", sa.String(16), nullable=False),
    sa.Column("dkim", sa.String(8), nullable=False),
    sa.Column("spf", sa.String(8), nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),            # JSON [[type, comment]]
    sa.Column("dkim_results", sa.Text, nullable=False),       # JSON [[d, s, result]]
    sa.Column("spf_domain", NAME, nullable=False),
    sa.Column("spf_scope", sa.String(8), nullable=False),     # mfrom, helo
    sa.Column("spf_result", sa.String(16), nullable=False),
    # JSON: the policy_published of the record that applied, and its rua URIs
    sa.Column("published", sa.Text, nullable=False),
    sa.Column("report_id", sa.String(64), nullable=True),
    sa.Column("claimed", TIMESTAMP, nullable=True),
    sa.Index(None, "report_id"),
    sa.Index(None, "arrived"),
)
