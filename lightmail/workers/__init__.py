"""Worker processes: sessions on every core, one main process in charge.

With ``[server] workers = N`` the main process (``twistd lightmail``) opens every
listening socket itself, then starts N workers (``python -m lightmail.workers.worker``)
that inherit those sockets and accept on them.  Each worker runs the protocol
sessions (SMTP, submission, LMTP, IMAP, POP3) with its own storage thread pools; the
main process keeps what must exist once: schema migrations, the queue runner and
outbound delivery, blob garbage collection, and the state that spans sessions:

- connection limits per listener (a worker asks before it greets a client),
- IMAP sessions per user and which session sees a message as \\Recent,
- the POP3 maildrop locks,
- mailbox change announcements, which it relays between workers so that IDLE and
  untagged updates work whichever process a session lives in.

They speak AMP over a socket pair per worker (``control.py``).  A worker that dies is
restarted; what it held (connections, sessions, locks) is released.  Accepted mail is
durable before any reply, whichever process took it, so a killed worker loses
nothing.  The same interfaces would carry the roadmap's several nodes over Redis.
"""
