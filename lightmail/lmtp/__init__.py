"""LMTP (RFC 2033): local delivery for an MTA in front of LightMail (Postfix, Exim)."""
