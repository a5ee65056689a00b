"""Several LightMail nodes on one database: who they are, in its nodes table, and what
they share besides it, in Redis.

No replication, consensus or membership protocol of LightMail's own: PostgreSQL (or
MariaDB) is the source of truth, and Redis carries only what may be lost, each key
expiring or being rebuilt by itself.  The node's main process holds the connection
(its worker processes ask it, as they do for a node alone: lightmail.workers).

``membership.py``
    This node's row in the database's nodes table (every node, Redis or not): its
    heartbeat, the refusal of a node id another process holds, the hand-back of a
    dead node's queue leases, and the marks of a drain.
``node.py``
    This node: its Redis connection, its name there, the leases it renews and
    ``/readyz``'s check.
``hub.py``
    The IMAP hub: mailbox changes across nodes (pub/sub), \\Recent, sessions per user.
``locks.py``
    POP3 maildrop locks.
``redis.py``
    The Redis connections of everything that uses Redis (rate limits, greylisting and
    the login guard too).

The keys, under ``[cluster] prefix`` (``lightmail:`` by default):

=============================  ==================================================
``changes``                    the pub/sub channel of mailbox changes (JSON:
                               origin, user, mailbox, kind, MODSEQ)
``recent:MAILBOX``             the first UID still \\Recent (30 days after its
                               last use)
``imap:sessions:USER``         sorted set of the user's IMAP sessions' marks,
                               scored by their expiry
``pop3:lock:USER``             the POP3 session holding the maildrop (its token)
``pop3:login:USER``            there for ``[pop3] login_delay`` after a login
``auth:fail:KEY``              the login guard's recent failures of a network or
                               an account
=============================  ==================================================
"""
