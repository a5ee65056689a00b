"""The outbound MTA: routing (MX lookup), the SMTP client, DSNs (RFC 3464)."""
