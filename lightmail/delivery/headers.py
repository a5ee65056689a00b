"""Header fields the SMTP delivery agent puts before a stored message as it leaves:
DKIM signatures (lightmail.policy.dkim) and ARC sets (lightmail.policy.arc.seal).

Which sources there are is decided where the agent is built (lightmail/service.py)
and by a reload (lightmail/reload/parts.py): :func:`outbound_headers` makes the one
object the agent asks, or None when nothing is added.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Optional

from zope.interface import Interface, implementer

from lightmail.storage.interfaces import QueueItem


class IOutboundHeaders(Interface):
    """Adds header fields to messages on their way out."""

    def header_for(item: QueueItem) -> Awaitable[bytes]:
        """The header fields to send before the stored message of ``item``,
        CRLF-terminated; ``b""`` for none.  Never fails for a message it cannot
        handle: it then adds nothing (and logs why)."""


@implementer(IOutboundHeaders)
class HeaderSources:
    """Several sources, their fields in the order given (the first on top).  Each
    works on the stored message alone: none signs what another adds."""

    def __init__(self, sources: Sequence[IOutboundHeaders]) -> None:
        self.sources = tuple(sources)

    async def header_for(self, item: QueueItem) -> bytes:
        parts = [await source.header_for(item) for source in self.sources]
        return b"".join(parts)


def outbound_headers(*sources: Optional[IOutboundHeaders]) -> Optional[IOutboundHeaders]:
    """What the agent asks: None without a source, the source itself when there is
    one, else :class:`HeaderSources` (the Nones left out)."""
    present = [source for source in sources if source is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return HeaderSources(present)
