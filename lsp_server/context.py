"""What the model sees: the text around the cursor, cut to a token budget by whole lines,
plus a few snippets from other open documents of the same language.

Pure functions over strings; `count_tokens` comes from the backend (the model's tokenizer, or
an estimate for remote backends).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lsp_server.documents import LINE_END, column_from_units, count_lines, line_span
from model.eval.context import cut_suffix  # the suffix is cut as the eval cuts it

CountTokens = Callable[[str], int]

WINDOW_CHARS = 64_000  # text looked at on each side of the cursor, whatever the document size
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
QUERY_LINES = 12  # lines before the cursor that a snippet is matched against
MIN_SNIPPET_SCORE = 0.1
MAX_WINDOWS_PER_DOCUMENT = 200
LINE_COMMENTS = {
    "python": "#", "ruby": "#", "shellscript": "#", "sh": "#", "bash": "#", "perl": "#",
    "r": "#", "yaml": "#", "toml": "#", "julia": "#", "elixir": "#", "nim": "#",
    "javascript": "//", "typescript": "//", "javascriptreact": "//", "typescriptreact": "//",
    "java": "//", "c": "//", "cpp": "//", "csharp": "//", "go": "//", "rust": "//",
    "swift": "//", "kotlin": "//", "scala": "//", "dart": "//", "php": "//", "zig": "//",
    "lua": "--", "haskell": "--", "sql": "--", "elm": "--",
    "lisp": ";;", "clojure": ";;", "scheme": ";;", "vim": '"',
}
BLOCK_OPENERS = (":", "{", "(", "[", "=>", " do", " then")


class PositionError(ValueError):
    """A position that does not exist in the document."""


@dataclass(frozen=True)
class Cursor:
    """The cursor in server terms: an index into the document's text."""

    offset: int
    line: int
    column: int  # in code points
    line_before: str  # text of the cursor's line before the cursor
    line_after: str  # text of the cursor's line after the cursor (no newline)


def units_of(text: str, encoding: str) -> int:
    """Length of `text` in the code units of `encoding`."""
    if encoding == "utf-32":
        return len(text)
    if encoding == "utf-8":
        return len(text.encode("utf-8", "surrogatepass"))
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def locate(text: str, line: int, character: int, encoding: str = "utf-16") -> Cursor:
    """The cursor at LSP position (line, character) of `text` (lines end at \\n, \\r\\n or \\r
    only). Raises PositionError when the line does not exist; a character past the end of its
    line means the end of the line."""
    if line < 0 or character < 0:
        raise PositionError(f"negative position ({line}, {character})")
    span = line_span(text, line)
    if span is None:
        raise PositionError(f"line {line} is past the end of the document "
                            f"({count_lines(text)} lines)")
    start, end = span
    line_text = text[start:end]
    column = column_from_units(line_text, character, encoding)
    return Cursor(start + column, line, column, line_text[:column], line_text[column:])


def normalize_line_ends(text: str) -> str:
    """`text` with every LSP line end ("\\r\\n", "\\r") written as "\\n"."""
    return LINE_END.sub("\n", text) if "\r" in text else text


def sanitize(text: str) -> str:
    """`text` with lone surrogates replaced (same length), so tokenizers accept it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(c if not 0xD800 <= ord(c) <= 0xDFFF else "\ufffd" for c in text)


def looks_binary(text: str) -> bool:
    return "\x00" in text


# ---------------------------------------------------------------------------------------------
# Budgets


def indentation(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def enclosing_headers(above: Sequence[str], level: int, limit: int = 3) -> list[int]:
    """Indices of the lines in `above` that open the blocks around a line indented by
    `level` (each the nearest line above with less indentation), in order. At most `limit`."""
    headers: list[int] = []
    for index in range(len(above) - 1, -1, -1):
        if level == 0 or len(headers) >= limit:
            break
        line = above[index]
        if line.strip() and indentation(line) < level:
            headers.append(index)
            level = indentation(line)
    return sorted(headers)


def cut_prefix(prefix: str, budget: int, count_tokens: CountTokens) -> str:
    """The end of `prefix` within `budget` tokens, in whole lines (the cursor's own line is
    always kept whole), keeping the headers of the enclosing blocks (the `def` line and the
    like) even when the lines between do not fit."""
    if count_tokens(prefix) <= budget:
        return prefix
    lines = prefix.split("\n")
    current = lines[-1]
    above = lines[:-1]
    spent = count_tokens(current)
    level = indentation(current) if current.strip() else len(current)
    headers = enclosing_headers(above, level)
    header_cost = {h: count_tokens(above[h]) + 1 for h in headers}
    kept_headers: list[int] = []
    for h in reversed(headers):  # nearest header first
        if spent + header_cost[h] <= budget:
            kept_headers.append(h)
            spent += header_cost[h]
    first = len(above)
    while first > 0:
        candidate = first - 1
        cost = 0 if candidate in kept_headers else count_tokens(above[candidate]) + 1
        if spent + cost > budget:
            break
        spent += cost
        first = candidate
    kept = sorted({*kept_headers, *range(first, len(above))})
    return "\n".join([above[i] for i in kept] + [current])


# ---------------------------------------------------------------------------------------------
# Snippets from other documents


@dataclass(frozen=True)
class Snippet:
    name: str
    text: str
    score: float


def _identifiers(text: str) -> set[str]:
    return set(IDENTIFIER.findall(text))


def pick_snippets(query: str, documents: Iterable[tuple[str, str]], max_snippets: int,
                  snippet_lines: int) -> list[Snippet]:
    """The chunks of `documents` ((name, text) pairs) most like `query`, by the Jaccard
    similarity of their identifiers (as llama.vim's ring buffer and Tabby's recent files
    do), best first; chunks scoring below MIN_SNIPPET_SCORE are left out."""
    wanted = _identifiers(query)
    if not wanted or max_snippets <= 0:
        return []
    found: list[Snippet] = []
    for name, text in documents:
        lines = text[:WINDOW_CHARS * 2].split("\n")
        stride = max(1, snippet_lines // 2)
        best: Snippet | None = None
        for window, start in enumerate(range(0, max(1, len(lines) - snippet_lines + 1), stride)):
            if window >= MAX_WINDOWS_PER_DOCUMENT:
                break
            chunk = "\n".join(lines[start:start + snippet_lines])
            have = _identifiers(chunk)
            if not have:
                continue
            score = len(wanted & have) / len(wanted | have)
            if best is None or score > best.score:
                best = Snippet(name, chunk, score)
        if best is not None and best.score >= MIN_SNIPPET_SCORE:
            found.append(best)
    found.sort(key=lambda s: -s.score)
    return found[:max_snippets]


def render_snippets(snippets: Sequence[Snippet], language_id: str | None, budget: int,
                    count_tokens: CountTokens) -> str:
    """Snippets as comments in the document's language ("Compare this snippet from NAME:"),
    within `budget` tokens; empty when the language's comment syntax is unknown."""
    comment = LINE_COMMENTS.get(language_id or "")
    if comment is None:
        return ""
    parts: list[str] = []
    spent = 0
    for snippet in snippets:
        body = "\n".join(f"{comment} {line}".rstrip() for line in snippet.text.split("\n"))
        block = f"{comment} Compare this snippet from {snippet.name}:\n{body}\n"
        cost = count_tokens(block)
        if spent + cost > budget:
            continue
        parts.append(block)
        spent += cost
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# The whole context


@dataclass(frozen=True)
class Context:
    prefix: str  # what the model sees before the hole (snippets included)
    suffix: str
    snippets: int  # snippets included


def build_context(text: str, cursor: Cursor, count_tokens: CountTokens, prefix_tokens: int,
                  suffix_tokens: int, snippet_tokens: int = 0,
                  others: Iterable[tuple[str, str]] = (), max_snippets: int = 0,
                  snippet_lines: int = 16, language_id: str | None = None) -> Context:
    # the model sees "\n" line ends whatever the document uses (CR-only, CRLF)
    before = normalize_line_ends(sanitize(text[max(0, cursor.offset - WINDOW_CHARS):
                                               cursor.offset]))
    after = normalize_line_ends(sanitize(text[cursor.offset:cursor.offset + WINDOW_CHARS]))
    if cursor.offset > WINDOW_CHARS:  # the window may start mid-line: drop that partial line
        before = before[before.find("\n") + 1:] if "\n" in before else before
    prefix = cut_prefix(before, prefix_tokens, count_tokens)
    suffix = cut_suffix(after, suffix_tokens, count_tokens)
    rendered = ""
    chosen: list[Snippet] = []
    if snippet_tokens > 0 and max_snippets > 0:
        query = "\n".join(prefix.split("\n")[-QUERY_LINES:])
        chosen = pick_snippets(query, others, max_snippets, snippet_lines)
        rendered = render_snippets(chosen, language_id, snippet_tokens, count_tokens)
    return Context(rendered + prefix, suffix, rendered.count("Compare this snippet from"))


def opens_block(line_before: str) -> bool:
    return line_before.rstrip().endswith(BLOCK_OPENERS)
