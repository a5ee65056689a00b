"""Fuzzing of SMTP, LMTP, POP3 and IMAP (issue 17): generated and mutated command
streams fed into the real protocol objects over an in-memory transport.

``world.py`` builds the server once (the factories ``makeService`` uses, on SQLite
and blobs in a temporary directory, with a demo user); ``grammar.py`` and the
per-protocol modules generate inputs with hypothesis; ``play.py`` feeds one input to
one session inside the reactor and measures it; ``oracle.py`` says what went wrong.
``tests/test_fuzz.py`` is the short run of ``make test``; ``run.py`` the long one of
``make fuzz``.  What is asserted, and the figures reached: docs/fuzzing.rst.
"""
