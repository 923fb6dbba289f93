"""Recent completions, for instant answers while the user types what is shown (type-along).

An entry remembers where a completion was made (document, the text before and after the
cursor) and the text shown. A later request whose prefix is the entry's prefix plus some
typed text that the completion starts with is answered with the rest of the completion,
without the model. Entries hold, and lookups read, only the text near the cursor, so memory
and time stay bounded whatever the document size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

EDGE_CHARS = 2048  # characters of prefix (its end) and suffix (its start) an entry compares


@dataclass(frozen=True)
class Entry:
    uri: str
    prefix_len: int
    prefix_edge: str  # the last EDGE_CHARS of the prefix
    suffix_edge: str  # the first EDGE_CHARS of the suffix
    completion: str


class CompletionCache:
    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, int, str, str], Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, uri: str, text: str, offset: int, completion: str) -> None:
        """Remember `completion`, made at `offset` (the cursor) in the document's `text`."""
        if not completion:
            return
        entry = Entry(uri, offset, text[max(0, offset - EDGE_CHARS):offset],
                      text[offset:offset + EDGE_CHARS], completion)
        key = (uri, entry.prefix_len, entry.prefix_edge, entry.suffix_edge)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, uri: str, text: str, offset: int) -> str | None:
        """The rest of a cached completion the user is typing along at `offset` in `text`,
        or None."""
        suffix_edge = text[offset:offset + EDGE_CHARS]
        for key in reversed(self._entries):
            entry = self._entries[key]
            if entry.uri != uri or entry.suffix_edge != suffix_edge:
                continue
            typed_len = offset - entry.prefix_len
            if not 0 <= typed_len < len(entry.completion):
                continue
            typed = text[entry.prefix_len:offset]
            if not entry.completion.startswith(typed):
                continue
            start = entry.prefix_len - len(entry.prefix_edge)
            if text[start:entry.prefix_len] != entry.prefix_edge:
                continue
            self._entries.move_to_end(key)
            return entry.completion[typed_len:]
        return None

    def forget(self, uri: str) -> None:
        for key in [k for k in self._entries if k[0] == uri]:
            del self._entries[key]

    def resize(self, size: int) -> None:
        self.size = size
        while len(self._entries) > size:
            self._entries.popitem(last=False)
