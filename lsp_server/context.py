"""What the model sees: the text around the cursor, cut to a token budget by whole lines,
plus a few snippets from other open documents of the same language.

The one prefix/suffix cutter, used by the server and by the HumanEval evaluation alike. Cutting
the prefix to its last N tokens loses what matters most (in a trial here, a 180-token prefix
dropped the `def` line in 131 of 200 HumanEval prompts), so the prefix is cut by whole lines,
keeping the signature of the enclosing function, the first and last lines of its docstring and
the headers of the other blocks around the cursor; lines are dropped, never split.

Pure functions over strings; `count_tokens` comes from the backend (the model's tokenizer, or
an estimate for remote backends).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from lsp_server.documents import LINE_END, column_from_units, count_lines, line_span
from lsp_server.settings import ContextSettings

CountTokens = Callable[[str], int]

DEF_LINE = re.compile(r"^\s*(async\s+)?def\s")
DOCSTRING_OPEN = re.compile(r"^\s*[rRuUbB]{0,2}(\"\"\"|''')")
MAX_SIGNATURE_LINES = 12  # a `def` whose header runs longer than this keeps only its first line
MAX_DEFS = 2  # the nearest function and the one around it
MAX_HEADERS = 3  # enclosing block headers (class, if, for, ...) kept while they fit
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


def enclosing_headers(above: Sequence[str], level: int, limit: int = MAX_HEADERS) -> list[int]:
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


def enclosing_defs(lines: Sequence[str]) -> list[int]:
    """Indices of the `def` lines around the end of `lines`, nearest first: the nearest `def`,
    then each `def` above it indented less. At most MAX_DEFS."""
    found: list[int] = []
    for index in range(len(lines) - 1, -1, -1):
        if len(found) >= MAX_DEFS:
            break
        line = lines[index]
        if DEF_LINE.match(line) and (not found or indentation(line) < indentation(
                lines[found[-1]])):
            found.append(index)
    return found


def signature_end(lines: Sequence[str], start: int) -> int:
    """Index of the line that ends the `def` header starting at `start` (the one ending in ':'
    outside brackets); `start` itself when none is found within MAX_SIGNATURE_LINES."""
    depth = 0
    for index in range(start, min(len(lines), start + MAX_SIGNATURE_LINES)):
        code = lines[index].split("#", 1)[0]
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        if depth <= 0 and code.rstrip().endswith(":"):
            return index
    return start


def docstring_span(lines: Sequence[str], after: int) -> tuple[int, int] | None:
    """(first, last) line indices of the docstring right after line `after`, or None."""
    index = after + 1
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index >= len(lines):
        return None
    match = DOCSTRING_OPEN.match(lines[index])
    if match is None:
        return None
    quote = match.group(1)
    if quote in lines[index][match.end():]:
        return index, index
    for end in range(index + 1, len(lines)):
        if quote in lines[end]:
            return index, end
    return index, len(lines) - 1  # still open at the hole


def cut_prefix(prefix: str, budget: int, count_tokens: CountTokens) -> str:
    """The part of `prefix` the model sees, within about `budget` tokens, in whole lines.

    Kept, in order of priority: the cursor's own line; the enclosing `def` headers with the
    first and last lines of their docstrings (the nearest one even when it alone exceeds the
    budget); the headers of the other enclosing blocks (class, if, for, ...) while they fit;
    the lines nearest the hole (a contiguous run upwards); the docstring lines from the top.
    """
    if count_tokens(prefix) <= budget:
        return prefix
    lines = prefix.split("\n")
    current, above = lines[-1], lines[:-1]
    cost: dict[int, int] = {}

    def line_cost(index: int) -> int:
        if index not in cost:
            cost[index] = count_tokens(above[index]) + 1  # + its newline
        return cost[index]

    spent = count_tokens(current)
    kept: set[int] = set()
    docstrings: list[tuple[int, int]] = []
    for header in enclosing_defs(above):
        must = set(range(header, signature_end(above, header) + 1))
        span = docstring_span(above, max(must))
        if span is not None:
            must |= {span[0], span[1]}
            docstrings.append(span)
        extra = sum(line_cost(i) for i in must - kept)
        if kept and spent + extra > budget:
            break
        kept |= must
        spent += extra
    level = indentation(current) if current.strip() else len(current)
    for header in reversed(enclosing_headers(above, level)):  # nearest first
        if header not in kept and spent + line_cost(header) <= budget:
            kept.add(header)
            spent += line_cost(header)
    first = len(above)  # the run of lines nearest the hole
    while first > 0:
        candidate = first - 1
        extra = 0 if candidate in kept else line_cost(candidate)
        if spent + extra > budget:
            break
        spent += extra
        first = candidate
    kept |= set(range(first, len(above)))
    for start, end in docstrings:  # docstring lines from the top, while they fit
        for index in range(start, end + 1):
            extra = 0 if index in kept else line_cost(index)
            if spent + extra > budget:
                break
            kept.add(index)
            spent += extra
    return "\n".join([above[i] for i in sorted(kept)] + [current])


def cut_suffix(suffix: str, budget: int, count_tokens: CountTokens) -> str:
    """The start of `suffix` within about `budget` tokens, by whole lines (the rest of the
    cursor's line is always kept)."""
    if count_tokens(suffix) <= budget:
        return suffix
    lines = suffix.split("\n")
    kept = [lines[0]]
    spent = count_tokens(lines[0])
    for line in lines[1:]:
        extra = count_tokens(line) + 1
        if spent + extra > budget:
            break
        kept.append(line)
        spent += extra
    return "\n".join(kept) + "\n"


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


def cut_hole(prefix: str, suffix: str, count_tokens: CountTokens, prefix_tokens: int,
             suffix_tokens: int) -> tuple[str, str]:
    """The prefix and suffix the model sees for a hole between `prefix` and `suffix`: at most
    WINDOW_CHARS of each looked at (so the cost does not grow with the document), then cut
    to their token budgets by whole lines. The server and `diffusion-lsp infill` both cut
    here. The model sees "\n" line ends whatever the text uses (CR-only, CRLF)."""
    before = normalize_line_ends(sanitize(prefix[-WINDOW_CHARS:]))
    if len(prefix) > WINDOW_CHARS:  # the window may start mid-line: drop that partial line
        before = before[before.find("\n") + 1:] if "\n" in before else before
    after = normalize_line_ends(sanitize(suffix[:WINDOW_CHARS]))
    return (cut_prefix(before, prefix_tokens, count_tokens),
            cut_suffix(after, suffix_tokens, count_tokens))


def build_context(text: str, cursor: Cursor, count_tokens: CountTokens,
                  budget: ContextSettings, *, others: Iterable[tuple[str, str]] = (),
                  language_id: str | None = None) -> Context:
    """What the model sees for the hole at `cursor`: the text around it cut to `budget`'s
    prefix and suffix tokens, and the snippets of `others` ((name, text) pairs) most like the
    lines before the cursor, as comments in `language_id` within `budget.snippet_tokens`."""
    # one character more than the window: cut_hole then sees whether the text went on
    prefix, suffix = cut_hole(text[max(0, cursor.offset - WINDOW_CHARS - 1):cursor.offset],
                              text[cursor.offset:cursor.offset + WINDOW_CHARS], count_tokens,
                              budget.prefix_tokens, budget.suffix_tokens)
    rendered = ""
    chosen: list[Snippet] = []
    if budget.snippet_tokens > 0 and budget.max_snippets > 0:
        query = "\n".join(prefix.split("\n")[-QUERY_LINES:])
        chosen = pick_snippets(query, others, budget.max_snippets, budget.snippet_lines)
        rendered = render_snippets(chosen, language_id, budget.snippet_tokens, count_tokens)
    return Context(rendered + prefix, suffix, rendered.count("Compare this snippet from"))


class OpenDocument(Protocol):
    """What a request and its snippets need of an open document (pygls' `TextDocument` has it)."""

    @property
    def source(self) -> str: ...

    @property
    def language_id(self) -> str | None: ...


def snippet_sources(uri: str, language_id: str | None, recent: Iterable[str],
                    documents: Mapping[str, OpenDocument]) -> list[tuple[str, str]]:
    """(file name, text) of the recently used open documents (`recent`, most recent first)
    in `language_id`, other than `uri`: where snippets are looked for."""
    found = []
    for other in recent:
        candidate = documents.get(other) if other != uri else None
        if candidate is not None and candidate.language_id == language_id:
            found.append((other.rsplit("/", 1)[-1], candidate.source))
    return found


def opens_block(line_before: str) -> bool:
    return line_before.rstrip().endswith(BLOCK_OPENERS)
