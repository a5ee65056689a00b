"""POP3 (RFC 1939, 2449, 5034, 2595): the maildrop is the user's INBOX."""
