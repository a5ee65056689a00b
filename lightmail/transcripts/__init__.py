"""Protocol transcripts of chosen sessions, for debugging (``[transcript]``).

Every octet a session reads or writes passes through one place when its transcript
is wanted: :class:`~lightmail.transcripts.tap.TranscriptProtocol`, put between the
transport (under TLS, so the text is plain) and the session by the listener's
factory (``ServiceFactory.tap``), in the main process and in workers alike.  A
scribe per protocol (``scribes.py``) turns the octets into lines and masks what is
secret; the lines go to a file per session or to the log (``tap.py``).

A session whose transcript is not wanted is not wrapped at all: it costs nothing.
"""

from __future__ import annotations


class SessionTranscript:
    """What a session tells its transcript (nothing, when it has none)."""

    def logged_in(self, user: str) -> None:
        """The session logged in as ``user``."""

    def deflating(self) -> None:
        """From the next octet on, both directions are raw DEFLATE (IMAP COMPRESS)."""


#: The transcript of a session that has none.
NO_TRANSCRIPT = SessionTranscript()
