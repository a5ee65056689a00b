"""The mail queue: the runner that leases queued recipients and hands them to
delivery agents (local mailboxes now; SMTP/LMTP relays with the outbound MTA)."""
