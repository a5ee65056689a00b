"""Parsed header blocks of recently read messages, shared by one process's sessions.

FETCH of header fields, SEARCH on header keys, SORT and THREAD read the same recent
messages' headers over and over (a client lists its newest mail at each sync).  A
blob never changes (it is named by its content), so its header block, once read from
the store's SQL copy and parsed, stays right: keeping it saves the SQL read and the
parse.  Bounded by count: a few MB at most.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from lightmail.imap.message import ParsedMessage

CACHED_HEADERS = 2048


class HeaderCache:
    def __init__(self, size: int = CACHED_HEADERS) -> None:
        self.size = size
        self.entries: OrderedDict[str, ParsedMessage] = OrderedDict()

    def get(self, blob_id: str) -> Optional[ParsedMessage]:
        parsed = self.entries.get(blob_id)
        if parsed is not None:
            self.entries.move_to_end(blob_id)
        return parsed

    def put(self, blob_id: str, parsed: ParsedMessage) -> ParsedMessage:
        self.entries[blob_id] = parsed
        self.entries.move_to_end(blob_id)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return parsed


HEADERS = HeaderCache()
