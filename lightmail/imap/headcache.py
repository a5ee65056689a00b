"""Parsed header blocks of recently read messages, shared by one process's sessions.

FETCH of header fields, SEARCH on header keys, SORT and THREAD read the same recent
messages' headers over and over (a client lists its newest mail at each sync, and a
SEARCH on a header key reads every header block of the mailbox).  A blob never
changes (it is named by its content), so its header block, once read from the
store's SQL copy and parsed, stays right: keeping it saves the SQL read and the
parse, as Dovecot's dovecot.index.cache keeps the header fields it was asked for.

Bounded by memory (``[imap] header_cache``), not by count: a count small enough for
big header blocks was too small for the header keys SEARCH reads.  Fifty users with
a hundred messages each, searched by Subject, cycled 5,000 header blocks through a
2,048-entry cache, which then never hit, and every SEARCH and FETCH read and parsed
again.  The cost of an entry is estimated from its size (see ``entry_cost``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from lightmail.imap.message import ParsedMessage

DEFAULT_BUDGET = 64 * 1024**2


def entry_cost(parsed: ParsedMessage) -> int:
    """Octets one cached header block takes, its parsed fields included (measured:
    about 1.9 KB for a 220-octet header block, 7 fields)."""
    return 1024 + 3 * parsed.size


class HeaderCache:
    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.used = 0
        self.entries: OrderedDict[str, tuple[ParsedMessage, int]] = OrderedDict()

    def get(self, blob_id: str) -> Optional[ParsedMessage]:
        entry = self.entries.get(blob_id)
        if entry is None:
            return None
        self.entries.move_to_end(blob_id)
        return entry[0]

    def put(self, blob_id: str, parsed: ParsedMessage) -> ParsedMessage:
        old = self.entries.pop(blob_id, None)
        if old is not None:
            self.used -= old[1]
        cost = entry_cost(parsed)
        if cost > self.budget:
            return parsed
        self.entries[blob_id] = (parsed, cost)
        self.used += cost
        self._shrink()
        return parsed

    def resize(self, budget: int) -> None:
        self.budget = budget
        self._shrink()

    def _shrink(self) -> None:
        while self.used > self.budget and self.entries:
            _, (_, cost) = self.entries.popitem(last=False)
            self.used -= cost


HEADERS = HeaderCache()
