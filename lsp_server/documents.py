"""Open documents as LSP defines them: lines end at "\\n", "\\r\\n" or "\\r" and nowhere else.

pygls' document model splits lines like `str.splitlines()`, which also breaks at U+2028,
U+2029, U+0085, form feeds, vertical tabs and \\x1c-\\x1e; an incremental edit below such a
character then lands on the wrong line and the server's copy drifts from the editor's. The
pure functions here do the arithmetic; `Document` and `Workspace` put them under pygls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lsprotocol import types
from pygls.workspace import TextDocument
from pygls.workspace import Workspace as PyglsWorkspace

LINE_END = re.compile(r"\r\n|\r|\n")  # the only line ends LSP knows


def encoding_name(kind: object) -> str:
    """"utf-8", "utf-16" or "utf-32" from a negotiated position encoding (lsprotocol's enum, a
    plain string, or None for the default). `str()` of the enum is its Python name."""
    value = getattr(kind, "value", kind)
    return value if isinstance(value, str) and value else "utf-16"


def split_lines(text: str) -> list[str]:
    """The lines of `text`, each with its line end ("" for a final line without one)."""
    lines, start = [], 0
    for match in LINE_END.finditer(text):
        lines.append(text[start:match.end()])
        start = match.end()
    if start < len(text) or not lines:
        lines.append(text[start:])
    return lines


def line_span(text: str, line: int) -> tuple[int, int] | None:
    """(start, end) offsets of line `line`'s text without its line end; None past the end."""
    if line < 0:
        return None
    if "\r" not in text:  # the common case, at str.find's speed
        start = 0
        for _ in range(line):
            newline = text.find("\n", start)
            if newline < 0:
                return None
            start = newline + 1
        end = text.find("\n", start)
        return start, len(text) if end < 0 else end
    start = 0
    for _ in range(line):
        match = LINE_END.search(text, start)
        if match is None:
            return None
        start = match.end()
    match = LINE_END.search(text, start)
    return start, match.start() if match else len(text)


def count_lines(text: str) -> int:
    """How many lines LSP sees in `text` (an empty text has one)."""
    return len(LINE_END.findall(text)) + 1


def column_from_units(line: str, units: int, encoding: str) -> int:
    """Code-point column of a position `units` code units into `line` (utf-8/16/32).

    Past the end of the line means the end of the line (LSP). Inside a character (half a
    surrogate pair, a partial UTF-8 sequence) rounds down to that character's start."""
    if encoding == "utf-32":
        return min(units, len(line))
    width = 2 if encoding == "utf-16" else 1
    seen = 0
    for index, char in enumerate(line):
        if encoding == "utf-8":
            size = len(char.encode("utf-8", "surrogatepass"))
        else:
            size = width if ord(char) > 0xFFFF else 1
        if seen + size > units:
            return index
        seen += size
    return len(line)


def offset_at(text: str, line: int, character: int, encoding: str = "utf-16") -> int:
    """Index into `text` of an LSP position, clamped as vscode-languageserver's TextDocument
    does: a line past the end is the end of the text, a character past the end of its line
    is the end of that line (before its line end)."""
    span = line_span(text, max(line, 0))
    if span is None:
        return len(text)
    start, end = span
    return start + column_from_units(text[start:end], max(character, 0), encoding)


def apply_edit(text: str, start: tuple[int, int], end: tuple[int, int], new_text: str,
               encoding: str = "utf-16") -> str:
    """`text` with the range start..end (LSP positions) replaced by `new_text`; a range whose
    end comes before its start is read the other way round (as VS Code does)."""
    first = offset_at(text, *start, encoding)
    last = offset_at(text, *end, encoding)
    first, last = min(first, last), max(first, last)
    return text[:first] + new_text + text[last:]


class Document(TextDocument):
    """pygls' TextDocument with LSP's line ends for lines and incremental edits."""

    @property
    def lines(self) -> Sequence[str]:
        return tuple(split_lines(self.source)) if self.source else ()

    def _apply_incremental_change(self, change: types.TextDocumentContentChangePartial) -> None:
        encoding = encoding_name(self.position_codec.encoding)
        start, end = change.range.start, change.range.end
        self._source = apply_edit(self.source, (start.line, start.character),
                                  (end.line, end.character), change.text, encoding)


class Workspace(PyglsWorkspace):
    """pygls' workspace, holding `Document`s."""

    @classmethod
    def like(cls, other: PyglsWorkspace) -> Workspace:
        """A workspace with `other`'s root, folders, sync kind and position encoding."""
        return cls(other.root_uri, other._sync_kind, list(other.folders.values()),
                   other.position_encoding)

    def _create_text_document(self, doc_uri: str, source: str | None = None,
                              version: int | None = None, language_id: str | None = None
                              ) -> TextDocument:
        return Document(doc_uri, source=source, version=version, language_id=language_id,
                        sync_kind=self._sync_kind, position_codec=self.position_codec)
