"""LightMail: a complete mail server, and a framework of mail protocols, on Twisted."""

__version__ = "0.1.0"
