"""Next edits, the protocol side: what the editor did, the region to rewrite, and the rewrite
turned back into LSP edits. Pure functions and small bounded stores; no LSP types, no tensors.

- `History`: one document's edits as unified diffs, oldest first. An edit close in time and
  place to the previous one is merged into it (one hunk for a word typed letter by letter);
  bounded by count and by characters.
- `Viewed`: where the user was in each document (the line), for the "recently viewed" snippets,
  cut from the documents' latest text when a next edit is asked for.
- `editable_region`: about 10-15 whole lines around the cursor, capped in tokens.
- `region_edits`: the smallest edits turning the old region into the new one.
- `undoes`: whether a suggestion would take back the user's latest edit (never shown).
- `Backoff`: a model that keeps predicting no edit is asked less and less often.

Texts here use "\\n" line ends (`context.normalize_line_ends`); positions are (line, column)
in code points, which do not depend on the line ends.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

HISTORY_EDITS = 8  # diffs kept per document
HISTORY_CHARS = 4000  # and at most this many characters of diffs per document (~1000 tokens)
HISTORY_PROMPT_EDITS = 5  # the latest diffs sent with a request (Inception: "the last 3-5")
MERGE_LINES = 3  # an edit within this many lines of the previous one ...
MERGE_SECONDS = 30.0  # ... and this soon after it extends the previous hunk
DIFF_CONTEXT = 2  # unchanged lines around a hunk
MAX_DOCUMENT_CHARS = 1_000_000  # larger documents keep no history (one copy is kept)
SNIPPET_LINES = 20  # lines per recently viewed snippet (Inception: about 20)
MAX_SNIPPETS = 5  # recently viewed snippets per request (Inception: 3-5)
VIEWED_DOCUMENTS = 32  # documents whose last viewed line is remembered
REGION_LINES_ABOVE = 4  # the editable region: lines above the cursor's line ...
REGION_LINES_BELOW = 8  # ... and below it (13 lines in all)
REGION_MAX_TOKENS = 200  # the region is shrunk (farthest lines first) to this many tokens
EMPTY_BEFORE_BACKOFF = 3  # empty answers in a row before requests start being skipped
MAX_SKIPPED = 32  # requests skipped in a row, at most (then the model is asked again)

CountTokens = Callable[[str], int]


@dataclass
class Entry:
    """One hunk of history: the document before and after it (for merging the next edit into
    it; only the latest entry keeps them), the lines it touched, and its diff."""

    diff: str
    first: int  # first changed line, in the text after the edit
    last: int  # last changed line (inclusive), in the text after the edit
    when: float
    before: str | None = None
    after: str | None = None


def changed_lines(before: str, after: str) -> tuple[int, int] | None:
    """(first, last) lines of `after` that differ from `before`; None when equal."""
    if before == after:
        return None
    a, b = before.split("\n"), after.split("\n")
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while (tail < min(len(a), len(b)) - head and a[len(a) - 1 - tail] == b[len(b) - 1 - tail]):
        tail += 1
    return head, max(head, len(b) - 1 - tail)


def unified_diff(path: str, before: str, after: str, context: int = DIFF_CONTEXT) -> str:
    """A unified diff of two texts, `--- path` / `+++ path` headers, "" when equal."""
    lines = difflib.unified_diff(before.split("\n"), after.split("\n"), path, path,
                                 n=context, lineterm="")
    return "\n".join(lines) + "\n" if before != after else ""


class History:
    """One document's edit history (see the module's docstring)."""

    def __init__(self, path: str, text: str, max_edits: int = HISTORY_EDITS,
                 max_chars: int = HISTORY_CHARS) -> None:
        self.path = path
        self.text = text  # the document as last seen
        self.entries: deque[Entry] = deque()
        self.max_edits, self.max_chars = max_edits, max_chars

    def observe(self, text: str, now: float | None = None) -> None:
        """The document is now `text`: record the edit since the last call."""
        now = time.monotonic() if now is None else now
        before, self.text = self.text, text
        span = changed_lines(before, text)
        if span is None:
            return
        latest = self.entries[-1] if self.entries else None
        if (latest is not None and latest.after == before and now - latest.when <= MERGE_SECONDS
                and span[0] <= latest.last + MERGE_LINES and span[1] >= latest.first - MERGE_LINES):
            self.entries.pop()
            start = latest.before if latest.before is not None else before
            merged = changed_lines(start, text)
            if merged is None:  # the edits cancelled out
                self._trim()
                return
            span, before = merged, start
        for entry in self.entries:  # only the latest keeps its texts
            entry.before = entry.after = None
        self.entries.append(Entry(unified_diff(self.path, before, text), span[0], span[1], now,
                                  before, text))
        self._trim()

    def _trim(self) -> None:
        while len(self.entries) > self.max_edits:
            self.entries.popleft()
        while len(self.entries) > 1 and sum(len(e.diff) for e in self.entries) > self.max_chars:
            self.entries.popleft()

    def diffs(self, limit: int = HISTORY_PROMPT_EDITS) -> tuple[str, ...]:
        """The latest `limit` diffs, oldest first; the last one is cut to the character budget."""
        chosen = list(self.entries)[-limit:]
        out, total = [], 0
        for entry in reversed(chosen):
            if total + len(entry.diff) > self.max_chars and out:
                break
            out.append(entry.diff[: self.max_chars])
            total += len(entry.diff)
        return tuple(reversed(out))

    def latest(self) -> Entry | None:
        return self.entries[-1] if self.entries else None


class Viewed:
    """The line the user was last at in each document, most recent first (bounded)."""

    def __init__(self, limit: int = VIEWED_DOCUMENTS) -> None:
        self.lines: OrderedDict[str, int] = OrderedDict()
        self.limit = limit

    def saw(self, uri: str, line: int) -> None:
        self.lines.pop(uri, None)
        self.lines[uri] = line
        while len(self.lines) > self.limit:
            self.lines.popitem(last=False)

    def forget(self, uri: str) -> None:
        self.lines.pop(uri, None)

    def snippets(self, current: str, texts: Callable[[str], str | None],
                 name: Callable[[str], str], max_snippets: int = MAX_SNIPPETS,
                 lines: int = SNIPPET_LINES) -> tuple[tuple[str, str], ...]:
        """(path, about `lines` lines around where the user was) for the other documents,
        oldest first, each cut from the document's latest text (`texts(uri)`)."""
        found: list[tuple[str, str]] = []
        for uri in reversed(self.lines):
            if uri == current:
                continue
            text = texts(uri)
            if text is None:
                continue
            found.append((name(uri), around(text, self.lines[uri], lines)))
            if len(found) == max_snippets:
                break
        return tuple(reversed(found))


def around(text: str, line: int, lines: int) -> str:
    """About `lines` whole lines of `text` centred on `line`."""
    all_lines = text.split("\n")
    line = min(max(line, 0), len(all_lines) - 1)
    start = max(0, min(line - lines // 2, len(all_lines) - lines))
    return "\n".join(all_lines[start:start + lines])


@dataclass(frozen=True)
class Region:
    """Whole lines `first`..`last` (inclusive) of a text, as offsets: `start` is the first
    line's start, `end` the last line's end (before its line end)."""

    first: int
    last: int
    start: int
    end: int


def line_starts(text: str) -> list[int]:
    starts = [0]
    index = text.find("\n")
    while index >= 0:
        starts.append(index + 1)
        index = text.find("\n", index + 1)
    return starts


def editable_region(text: str, line: int, count_tokens: CountTokens,
                    above: int = REGION_LINES_ABOVE, below: int = REGION_LINES_BELOW,
                    max_tokens: int = REGION_MAX_TOKENS) -> Region:
    """The lines around `line` the suggestion may rewrite: `above` lines above it and `below`
    below, shrunk (the line farthest from the cursor first) to `max_tokens`; the cursor's line
    always stays."""
    starts = line_starts(text)
    count = len(starts)
    line = min(max(line, 0), count - 1)
    first, last = max(0, line - above), min(count - 1, line + below)

    def end_of(index: int) -> int:
        return starts[index + 1] - 1 if index + 1 < count else len(text)

    while first < last and count_tokens(text[starts[first]:end_of(last)]) > max_tokens:
        if line - first > last - line:
            first += 1
        else:
            last -= 1
    return Region(first, last, starts[first], end_of(last))


@dataclass(frozen=True)
class Change:
    """Replace text[start:end] with `text` (offsets into the document)."""

    start: int
    end: int
    text: str


def region_edits(old: str, new: str, offset: int = 0, at_end: bool = False) -> list[Change]:
    """The smallest changes turning `old` into `new` (line blocks from difflib, each trimmed to
    the characters that differ), as offsets into a document where `old` starts at `offset` and
    is followed by a line end (or ends the document: `at_end`)."""
    if old == new:
        return []
    old_n, new_lines = old + "\n", new.split("\n")
    starts = line_starts(old_n)
    matcher = difflib.SequenceMatcher(None, old.split("\n"), new_lines, autojunk=False)
    changes = []
    blocks = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "replace" and i2 - i1 == j2 - j1:  # line for line: one change per line
            blocks.extend((i1 + k, i1 + k + 1, j1 + k, j1 + k + 1) for k in range(i2 - i1))
        elif tag != "equal":
            blocks.append((i1, i2, j1, j2))
    for i1, i2, j1, j2 in blocks:
        start, end = starts[i1], starts[i2] if i2 < len(starts) else len(old_n)
        removed = old_n[start:end]
        added = "".join(line + "\n" for line in new_lines[j1:j2])
        head = 0
        while head < min(len(removed), len(added)) and removed[head] == added[head]:
            head += 1
        tail = 0
        while (tail < min(len(removed), len(added)) - head
               and removed[len(removed) - 1 - tail] == added[len(added) - 1 - tail]):
            tail += 1
        first, last, text = start + head, end - tail, added[head:len(added) - tail]
        if at_end and last > len(old):  # the final line end is not in the document
            if first > len(old) and text.endswith("\n"):
                first, text = len(old), "\n" + text[:-1]
            elif text.endswith("\n"):
                text = text[:-1]
            first, last = min(first, len(old)), len(old)
        changes.append(Change(offset + first, offset + last, text))
    return [c for c in changes if c.start != c.end or c.text]


def apply_changes(text: str, changes: Iterable[Change]) -> str:
    for change in sorted(changes, key=lambda c: c.start, reverse=True):
        text = text[:change.start] + change.text + text[change.end:]
    return text


def undoes(latest: Entry | None, text: str, changes: list[Change]) -> bool:
    """Whether `changes` to `text` would take back the user's latest edit: delete what it
    inserted, or put back what it deleted (Zed's and Inception's advice: never remove what the
    user just wrote)."""
    if latest is None or latest.before is None or latest.after != text or not changes:
        return False
    matcher = difflib.SequenceMatcher(None, latest.before, latest.after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        inserted = (j1, j2)
        removed = latest.before[i1:i2]
        for change in changes:
            if j2 > j1 and change.start < inserted[1] and change.end > inserted[0]:
                # a change reaching into what was just typed, keeping less of it
                kept = change.text.find(latest.after[max(j1, change.start):min(j2, change.end)])
                if kept < 0:
                    return True
            if removed.strip() and change.start <= j1 <= change.end and removed in change.text:
                return True
    return False


def suggestion(text: str, region: Region, rewritten: str, latest: Entry | None) -> list[Change]:
    """The changes to offer for a rewritten region: none when nothing changed or when they
    would undo the user's latest edit."""
    changes = region_edits(text[region.start:region.end], rewritten, region.start,
                           at_end=region.end == len(text))
    if undoes(latest, text, changes):
        return []
    return changes


class Memory:
    """What the server keeps for next edits: each open document's history and where the user
    was. Bounded: documents over MAX_DOCUMENT_CHARS keep no history, closing forgets."""

    def __init__(self) -> None:
        self.histories: dict[str, History] = {}
        self.viewed = Viewed()

    def opened(self, uri: str, path: str, text: str) -> None:
        if len(text) <= MAX_DOCUMENT_CHARS:
            self.histories[uri] = History(path, text)
        self.viewed.saw(uri, 0)

    def changed(self, uri: str, text: str, path: str) -> None:
        history = self.histories.get(uri)
        if len(text) > MAX_DOCUMENT_CHARS:
            self.histories.pop(uri, None)
            return
        if history is None:  # grew back under the limit: start again from here
            self.histories[uri] = History(path, text)
            return
        history.observe(text)
        latest = history.latest()
        if latest is not None:
            self.viewed.saw(uri, latest.last)

    def closed(self, uri: str) -> None:
        self.histories.pop(uri, None)
        self.viewed.forget(uri)


class Backoff:
    """Whether to ask the model for a next edit now. After EMPTY_BEFORE_BACKOFF empty answers
    in a row, each further empty answer doubles the number of requests skipped before the
    next one is asked (1, 2, 4, ... up to MAX_SKIPPED); a suggested edit starts again from
    zero. Counted in requests, not seconds: it follows the user's pace."""

    def __init__(self) -> None:
        self.empty = 0  # empty answers in a row
        self.skip = 0  # requests still to skip

    def should_ask(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def answered(self, suggested: bool) -> None:
        if suggested:
            self.empty = self.skip = 0
            return
        self.empty += 1
        if self.empty >= EMPTY_BEFORE_BACKOFF:
            self.skip = min(2 ** (self.empty - EMPTY_BEFORE_BACKOFF), MAX_SKIPPED)


FEEDBACK_KINDS = ("nextEdit", "completion")
PENDING_SHOWN = 256  # suggestions shown and not yet accepted or rejected, at most


class Feedback:
    """Shown / accepted / rejected suggestions per kind. A suggestion carries an id (in its
    `command`); it is shown once the client says so, accepted when the client runs its command
    or when the document becomes what applying it gives (copilot-lsp applies an edit without
    running its command), rejected when the client dismisses it or when another suggestion for
    the same document is shown (or the document closes) while it is pending."""

    def __init__(self) -> None:
        self.counts = {kind: {"shown": 0, "accepted": 0, "rejected": 0, "partial": 0}
                       for kind in FEEDBACK_KINDS}
        self.offered: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (kind, uri)
        self.pending: OrderedDict[str, tuple[str, str]] = OrderedDict()  # shown, undecided
        self.results: dict[str, str] = {}  # id -> digest of the document once it is applied

    def offer(self, item_id: str, kind: str, uri: str, result: str | None = None) -> None:
        self.offered[item_id] = (kind, uri)
        if result is not None:
            self.results[item_id] = digest(result)
        while len(self.offered) > PENDING_SHOWN:
            gone, _ = self.offered.popitem(last=False)
            self.results.pop(gone, None)

    def document_changed(self, uri: str, text: str) -> None:
        """Accept a shown suggestion for `uri` whose result the document now is."""
        mine = [i for i, (_, other) in self.pending.items() if other == uri and i in self.results]
        if not mine:
            return
        now = digest(text)
        for item_id in mine:
            if self.results.get(item_id) == now:
                self.accepted(item_id)

    def shown(self, item_id: str | None) -> bool:
        where = self.offered.get(item_id) if item_id else None
        if where is None or item_id in self.pending:
            return False
        kind, uri = where
        for other, (other_kind, other_uri) in list(self.pending.items()):
            if other_kind == kind and other_uri == uri:
                self._decide(other, "rejected")
        self.counts[kind]["shown"] += 1
        self.pending[item_id] = where
        while len(self.pending) > PENDING_SHOWN:
            self.pending.popitem(last=False)
        return True

    def accepted(self, item_id: str | None, partial: bool = False) -> bool:
        if item_id not in self.pending and item_id in self.offered:
            self.shown(item_id)  # a client that never said it showed it
        if item_id not in self.pending:
            return False
        if partial:
            kind, _ = self.pending[item_id]
            self.counts[kind]["partial"] += 1
        self._decide(item_id, "accepted")
        return True

    def rejected(self, item_id: str | None) -> bool:
        if item_id not in self.pending:
            return False
        self._decide(item_id, "rejected")
        return True

    def closed(self, uri: str) -> None:
        for item_id, (_, other_uri) in list(self.pending.items()):
            if other_uri == uri:
                self._decide(item_id, "rejected")

    def _decide(self, item_id: str, outcome: str) -> None:
        kind, _ = self.pending.pop(item_id)
        self.counts[kind][outcome] += 1
        self.offered.pop(item_id, None)
        self.results.pop(item_id, None)

    def snapshot(self) -> dict:
        out = {}
        for kind, counts in self.counts.items():
            decided = counts["accepted"] + counts["rejected"]
            out[kind] = {**counts, "acceptanceRate": round(counts["accepted"] / decided, 3)
                         if decided else None}
        return out


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def item_id(item: object) -> str | None:
    """The suggestion id in a client's `{item: {command: {arguments: [id]}}}` (or a bare
    `{command}`), as pygls decodes it; None when there is none."""
    for name in ("item", None):
        holder = getattr(item, name, None) if name else item
        command = getattr(holder, "command", None)
        arguments = getattr(command, "arguments", None)
        if arguments and isinstance(arguments[0], str):
            return arguments[0]
    return None


def position_of(text: str, offset: int, units: Callable[[str], int]) -> tuple[int, int]:
    """(line, character) of `offset` in a "\\n"-ended text; `units` measures a line's prefix in
    the negotiated encoding."""
    line = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    return line, units(text[start:offset])
