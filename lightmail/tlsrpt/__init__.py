"""SMTP TLS Reporting (RFC 8460): what became of the outbound MTA's TLS negotiations,
counted per policy domain and day in SQL (``store``), and sent once a day to the
addresses each domain publishes in its ``_smtp._tls`` TXT record (``job``), as gzipped
JSON reports (``report``): by mail through LightMail's own queue, or by HTTPS POST."""
