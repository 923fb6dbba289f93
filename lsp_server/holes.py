"""Hole markers in a document, and how their fills go back in: the pure part of the "Fill N
holes" code action (the server lists and resolves it; the model fills the holes jointly).

Markers (each replaced exactly, nothing around it):
- `...` standing alone as a statement (a line holding only it),
- a comment line saying TODO (`# TODO`, `// TODO`, `-- TODO`: the comment, to the line end),
- Rust's `todo!()` / `unimplemented!()` (with or without a message),
- every match of a `holes.patterns` regular expression.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
from lsprotocol import types

from lsp_server.backends.base import HolesJob
from lsp_server.context import PositionError, cut_hole, normalize_line_ends, sanitize, units_of
from lsp_server.documents import LINE_END, count_lines, line_span, offset_at
from lsp_server.settings import Settings

log = logging.getLogger("diffusion_lsp")

ELLIPSIS = re.compile(r"^[ \t]*(\.\.\.)[ \t]*\r?$", re.MULTILINE)
TODO_COMMENT = re.compile(r"^[ \t]*((?:#|//|--)[ \t]*TODO\b[^\r\n]*?)[ \t]*\r?$",
                          re.MULTILINE)
RUST_TODO = re.compile(r"\b(?:todo|unimplemented)!\((?:[^()\r\n]|\([^()\r\n]*\))*\)")
# a line that starts a function, in the languages people write holes in (Python, Rust, Go,
# JavaScript/TypeScript, Lua, Kotlin, Swift, ...): for a code action over an empty range
FUNCTION_HEADER = re.compile(
    r"^[ \t]*(?:(?:pub(?:\([^)]*\))?|export|default|async|local|static|public|private|"
    r"protected|unsafe|const|extern|override|suspend|inline)\s+)*"
    r"(?:def|fn|func|function|fun)\b")
CLOSERS = ("}", "end", ")", "]")  # a block's closing line, at its header's indentation


@dataclass(frozen=True)
class Marker:
    """A hole marker: [start, end) offsets into the document's text, and its kind."""

    start: int
    end: int
    kind: str  # ellipsis | todo | rust | pattern


def compile_patterns(patterns: Sequence[str]) -> tuple[list[re.Pattern], list[str]]:
    """The user's marker patterns compiled, and a problem line per one that does not compile."""
    compiled, problems = [], []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.MULTILINE))
        except re.error as error:
            problems.append(f"holes.patterns: {pattern!r} is not a regular expression ({error})")
    return compiled, problems


@functools.lru_cache(maxsize=8)
def compiled_patterns(patterns: tuple[str, ...]) -> tuple[list[re.Pattern], list[str]]:
    """`compile_patterns`, remembered for the few pattern lists a session uses."""
    return compile_patterns(patterns)


def _all_markers(text: str, start: int, end: int, patterns: Sequence[re.Pattern]
                 ) -> list[Marker]:
    """Every marker on the lines from `start`'s to `end`'s (only that part of the document is
    searched: editors ask on every cursor move)."""
    newline = text.find("\n", end)
    stop = len(text) if newline < 0 else newline
    start = max(text.rfind("\n", 0, start), text.rfind("\r", 0, start)) + 1
    found = [Marker(m.start(1), m.end(1), "ellipsis") for m in ELLIPSIS.finditer(text, start, stop)]
    found += [Marker(m.start(1), m.end(1), "todo")
              for m in TODO_COMMENT.finditer(text, start, stop)]
    found += [Marker(m.start(), m.end(), "rust") for m in RUST_TODO.finditer(text, start, stop)]
    for pattern in patterns:
        found += [Marker(m.start(), m.end(), "pattern")
                  for m in pattern.finditer(text, start, stop) if m.end() > m.start()]
    return found


def find_markers(text: str, start: int, end: int, patterns: Sequence[re.Pattern] = ()
                 ) -> tuple[list[Marker], int]:
    """Markers lying wholly within [start, end), in order, none overlapping another; and how
    many were dropped because they overlapped an earlier (or longer) one."""
    inside = [m for m in _all_markers(text, start, end, patterns)
              if start <= m.start and m.end <= end]
    inside.sort(key=lambda m: (m.start, -m.end))
    kept: list[Marker] = []
    for marker in inside:
        if kept and marker.start < kept[-1].end:
            continue
        kept.append(marker)
    return kept, len(inside) - len(kept)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def enclosing_function(text: str, offset: int) -> tuple[int, int] | None:
    """[start, end) offsets of the function around `offset`: from the nearest header line at
    or above it (no deeper than the cursor's line) to the line before the first non-blank line
    back at the header's indentation (a closing `}` / `end` there belongs to the function).
    None when no function encloses it."""
    lines = normalize_line_ends(text[:offset]).split("\n")
    row = len(lines) - 1
    all_lines = [line.rstrip("\r") for line in LINE_END.split(text)]
    starts = [0]
    for match in LINE_END.finditer(text):
        starts.append(match.end())
    cursor_indent = _indent(all_lines[row]) if all_lines[row].strip() else 1 << 30
    header = None
    for index in range(row, -1, -1):
        line = all_lines[index]
        if FUNCTION_HEADER.match(line) and (_indent(line) <= cursor_indent or index == row):
            header = index
            break
        if line.strip():
            cursor_indent = min(cursor_indent, _indent(line))
    if header is None:
        return None
    level = _indent(all_lines[header])
    last = header
    for index in range(header + 1, len(all_lines)):
        line = all_lines[index]
        if not line.strip():
            continue
        if _indent(line) <= level:
            if line.strip().startswith(CLOSERS):
                last = index
            break
        last = index
    end = starts[last] + len(all_lines[last])
    return starts[header], end


def pieces_for(text: str, markers: Sequence[Marker], count_tokens: Callable[[str], int],
               prefix_tokens: int, suffix_tokens: int) -> list[str]:
    """The text around the markers, as the model sees it: before the first, between each two,
    after the last; the outer two cut to their token budgets (`context.cut_hole`), every piece
    with "\\n" line ends."""
    inner = [text[a.end:b.start] for a, b in zip(markers, markers[1:], strict=False)]
    before, after = cut_hole(text[:markers[0].start], text[markers[-1].end:], count_tokens,
                             prefix_tokens, suffix_tokens)
    return [before, *(normalize_line_ends(sanitize(piece)) for piece in inner), after]


def fit_fill(fill: str, text: str, marker: Marker) -> str | None:
    """A hole's fill as it goes into the document in place of `marker`: trailing blanks and
    blank lines off, its first line starting where the marker did, every later line at least
    as deep as the marker's line (its indentation is kept: the fill stays inside the block),
    the document's line ends. None when the model left the hole empty: the marker stays."""
    fill = fill.strip()
    if not fill:
        return None
    line_start = max(text.rfind("\n", 0, marker.start), text.rfind("\r", 0, marker.start)) + 1
    line = text[line_start:marker.start]
    indent = line[:_indent(line)]
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = [row.rstrip() for row in fill.split("\n")]
    fitted = [lines[0]] + [row if not row or row.startswith(indent)
                           else indent + row.lstrip(" \t") for row in lines[1:]]
    return newline.join(fitted)


def position_of(text: str, offset: int, encoding: str) -> tuple[int, int]:
    """(line, character) of `offset` in `text`, in the negotiated encoding's code units."""
    line = len(LINE_END.findall(text, 0, offset)) if offset else 0
    span = line_span(text, line)
    start = span[0] if span is not None else 0
    return line, units_of(text[start:offset], encoding)


def range_offsets(text: str, where: types.Range, encoding: str) -> tuple[int, int]:
    """[start, end) offsets the markers are looked for in: the range, or for an empty range the
    function around it (the whole document outside any function). Raises PositionError for a
    range that does not lie in the document (its end may be the start of the line after the
    last, as whole-document selections are)."""
    lines = count_lines(text)
    for position in (where.start, where.end):
        past_end = position.line == lines and position.character == 0
        if position.line < 0 or position.character < 0 or (position.line >= lines
                                                             and not past_end):
            raise PositionError(f"range {where.start.line}:{where.start.character}-"
                                f"{where.end.line}:{where.end.character} is not in the document "
                                f"({lines} lines)")
    start = offset_at(text, where.start.line, where.start.character, encoding)
    end = offset_at(text, where.end.line, where.end.character, encoding)
    if end < start:
        raise PositionError("the range ends before it starts")
    if start == end:
        around = enclosing_function(text, start)
        return around if around is not None else (0, len(text))
    return start, end


class ActionData(msgspec.Struct):
    """What a listed action carries to its resolve: the document's version and each marker's
    offsets and text when it was listed (checked again before anything is filled)."""

    uri: str
    version: int | None
    markers: list[tuple[int, int]]
    texts: list[str]

    def listed(self) -> list[Marker]:
        """The markers as they were when the action was listed."""
        return [Marker(start, end, "listed") for start, end in self.markers]


def offer(uri: str, version: int | None, text: str, span: tuple[int, int],
          settings: Settings) -> ActionData | None:
    """The data of the action filling the markers in `span` of `text`, or None when there is
    none to fill or more than `holes.maxHoles` (overlapping markers are left out, and logged)."""
    patterns, _ = compiled_patterns(tuple(settings.holes.patterns))
    markers, dropped = find_markers(text, *span, patterns)
    if dropped:
        log.info("%d overlapping hole marker(s) in %s left out", dropped, uri)
    if not markers or len(markers) > settings.holes.max_holes:
        return None
    return ActionData(uri, version, [(m.start, m.end) for m in markers],
                      [text[m.start:m.end] for m in markers])


def holes_job(text: str, data: ActionData, count_tokens: Callable[[str], int],
              settings: Settings) -> HolesJob:
    """What the backend fills for the action's markers in `text`: all of them jointly, each
    within `holes.maxTokens`, under the completion's sampler settings."""
    completion = settings.completion
    return HolesJob(
        pieces=tuple(pieces_for(text, data.listed(), count_tokens,
                                settings.context.prefix_tokens, settings.context.suffix_tokens)),
        markers=tuple(data.texts), max_tokens=settings.holes.max_tokens,
        threshold=completion.threshold, tokens_per_step=completion.tokens_per_step,
        sampler=completion.sampler)


def read_action_data(data: object) -> ActionData | None:
    """The action's data as ours, or None (another server's action, or a mangled one)."""
    try:
        parsed = msgspec.convert(data, ActionData)
    except (msgspec.ValidationError, TypeError):
        return None
    if not parsed.markers or len(parsed.markers) != len(parsed.texts):
        return None
    return parsed


def still_current(text: str, version: int | None, data: ActionData) -> bool:
    """Whether the document is as it was when the action was listed."""
    if version != data.version:
        return False
    previous = 0
    for (start, end), marker in zip(data.markers, data.texts, strict=True):
        if start < previous or end < start or text[start:end] != marker:
            return False
        previous = end
    return True


def filled_text(text: str, markers: Sequence[Marker], fills: Sequence[str]) -> str:
    """`text` as `text_edits` would leave it: each marker replaced by its fitted fill."""
    pieces, last = [], 0
    for marker, fill in zip(markers, fills, strict=True):
        fitted = fit_fill(fill, text, marker)
        if fitted is not None:
            pieces += [text[last:marker.start], fitted]
            last = marker.end
    return "".join(pieces) + text[last:]


def text_edits(text: str, markers: Sequence[Marker], fills: Sequence[str],
               encoding: str) -> list[types.TextEdit]:
    """One edit per marker the model filled, replacing exactly the marker; an empty fill
    leaves its marker as it was."""
    edits = []
    for marker, fill in zip(markers, fills, strict=True):
        fitted = fit_fill(fill, text, marker)
        if fitted is None:
            continue
        start, end = position_of(text, marker.start, encoding), position_of(text, marker.end,
                                                                             encoding)
        edits.append(types.TextEdit(
            range=types.Range(start=types.Position(line=start[0], character=start[1]),
                              end=types.Position(line=end[0], character=end[1])),
            new_text=fitted))
    return edits
