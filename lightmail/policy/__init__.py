"""Mail policy: what LightMail adds to or checks in messages (DKIM signing, and the
SPF evaluator for incoming mail; DKIM verification and DMARC later)."""
