"""Mail policy: what LightMail adds to or checks in messages (DKIM signing now;
SPF, DKIM verification and DMARC for incoming mail later)."""
