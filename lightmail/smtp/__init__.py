"""SMTP: the inbound MX (port 25) and message submission (587 STARTTLS, 465 TLS).

``session.py`` is the protocol (RFC 5321 and its extensions), ``policy.py`` the hook
object it consults at each step (recipient checks, relay rules, queueing), and
``codes.py`` the replies with their enhanced status codes (RFC 3463).
"""
