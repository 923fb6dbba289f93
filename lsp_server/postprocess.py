"""Clean-up of a raw infill before it reaches the editor.

Each rule is a small pure function; `clean` applies them in order. The rules follow what
Copilot, Tabby and llama.vim do: never repeat what is already after the cursor, never close a
bracket the suffix already closes, stop a multi-line completion when it leaves the block it
started in, keep the document's indentation style, and drop empty results.
"""

from __future__ import annotations

from dataclasses import dataclass

from lsp_server.context import Cursor, indentation, opens_block

OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {v: k for k, v in OPENERS.items()}
MIN_REPEAT_CHARS = 4  # a repeated suffix line shorter than this ("}", ")") is not a repeat
BELOW_LINES = 8  # lines after the cursor's line the clean-up compares against
BELOW_CHARS = 4096  # text after the cursor's line looked at for them
INDENT_CHARS = 8192  # text on each side of the cursor its indentation step is read from


@dataclass(frozen=True)
class Surroundings:
    """What the clean-up needs to know about where the completion goes."""

    line_before: str  # the cursor's line before the cursor
    line_after: str  # the cursor's line after the cursor
    below: tuple[str, ...]  # the next lines of the document after the cursor's line
    indent_unit: str  # "\t" or some spaces: the document's indentation step
    multiline: bool
    max_lines: int = 12


def surroundings(text: str, cursor: Cursor, multiline: bool, max_lines: int) -> Surroundings:
    """Where a completion at `cursor` of the document's `text` goes, as the clean-up sees it:
    the cursor's line, the lines below it and the indentation step near it."""
    below_start = text.find("\n", cursor.offset)
    below = text[below_start + 1:below_start + 1 + BELOW_CHARS].split("\n")[:BELOW_LINES] if (
        below_start >= 0) else []
    lines_near = text[max(0, cursor.offset - INDENT_CHARS):cursor.offset + INDENT_CHARS]
    return Surroundings(cursor.line_before, cursor.line_after, tuple(below),
                        detect_indent_unit(lines_near.split("\n")), multiline, max_lines)


def choose_multiline(line_before: str, line_after: str, setting: str = "auto") -> bool:
    """Multi-line on an empty line (or right after a block opener at the end of a line);
    single-line when the cursor is mid-line or the line already has code before it."""
    if setting != "auto":
        return setting == "always"
    if line_after.strip():
        return False
    return not line_before.strip() or opens_block(line_before)


def detect_indent_unit(lines: list[str] | tuple[str, ...]) -> str:
    """The document's indentation step: a tab, or the smallest positive difference between
    consecutive space indents (4 when nothing is indented)."""
    tabs = spaces = 0
    steps: dict[int, int] = {}
    previous = 0
    for line in lines[:2000]:
        if not line.strip():
            continue
        lead = line[: indentation(line)]
        if lead.startswith("\t"):
            tabs += 1
            continue
        if lead:
            spaces += 1
        width = len(lead)
        if width > previous:
            steps[width - previous] = steps.get(width - previous, 0) + 1
        previous = width
    if tabs > spaces:
        return "\t"
    if not steps:
        return "    "
    return " " * max(steps, key=lambda step: (steps[step], -step))


# ---------------------------------------------------------------------------------------------
# Rules


def first_line_only(text: str, where: Surroundings) -> str:
    return text if where.multiline else text.split("\n", 1)[0]


def trim_line_suffix(text: str, where: Surroundings) -> str:
    """Drop the end of the completion's first line when it repeats the rest of the cursor's
    line (the model often rewrites `)` or `):` that is already there)."""
    rest = where.line_after.strip()
    if not rest:
        return text
    first, newline, others = text.partition("\n")
    if first.rstrip().endswith(rest):
        first = first.rstrip()[: -len(rest)]
    else:
        first = drop_closed_brackets(first, rest)
    return first + newline + others


def drop_closed_brackets(text: str, after: str) -> str:
    """Remove closing brackets at the end of `text` that close something opened before the
    completion when `after` (the text after the cursor) already closes it."""
    depth: list[str] = []
    unmatched_end = len(text)
    for index, char in enumerate(text):
        if char in OPENERS:
            depth.append(char)
        elif char in CLOSERS:
            if depth and depth[-1] == CLOSERS[char]:
                depth.pop()
            else:
                unmatched_end = min(unmatched_end, index)
    tail = text[unmatched_end:]
    if unmatched_end == len(text) or tail.strip(" )]}:;,") != "":
        return text
    closers = tail.replace(" ", "")
    if after.replace(" ", "").startswith(closers):
        return text[:unmatched_end].rstrip()
    return text


def trim_repeated_lines(text: str, where: Surroundings) -> str:
    """Cut the completion where its lines start repeating the lines below the cursor."""
    below = [line.strip() for line in where.below if line.strip()]
    if not below or "\n" not in text:
        return text
    lines = text.split("\n")
    for index in range(1, len(lines)):
        line = lines[index].strip()
        if len(line) >= MIN_REPEAT_CHARS and line == below[0]:
            return "\n".join(lines[:index])
    return text


def stop_at_dedent(text: str, where: Surroundings) -> str:
    """End a multi-line completion before the first line that leaves the block the cursor is
    in (less indented than the block; after an opener, not more indented than its line)."""
    if "\n" not in text:
        return text
    if opens_block(where.line_before):
        limit = indentation(where.line_before) + 1  # the body must be deeper than the opener
    else:
        limit = indentation(where.line_before) if where.line_before.strip() else len(
            where.line_before)
    lines = text.split("\n")
    for index in range(1, len(lines)):
        line = lines[index]
        if line.strip() and indentation(line) < limit:
            return "\n".join(lines[:index])
    return text


def limit_lines(text: str, where: Surroundings) -> str:
    return "\n".join(text.split("\n")[: where.max_lines])


def match_indentation(text: str, where: Surroundings) -> str:
    """Rewrite the leading whitespace of lines after the first in the document's style."""
    if "\n" not in text:
        return text
    unit = where.indent_unit
    first, *rest = text.split("\n")
    fixed = [first]
    for line in rest:
        width = indentation(line)
        lead, body = line[:width], line[width:]
        if unit == "\t" and " " in lead:
            columns = len(lead.expandtabs(4))
            lead = "\t" * (columns // 4) + " " * (columns % 4)
        elif unit != "\t" and "\t" in lead:
            lead = lead.replace("\t", unit)
        fixed.append(lead + body)
    return "\n".join(fixed)


def strip_trailing(text: str, where: Surroundings) -> str:
    """No trailing whitespace or blank lines at the end (the document has its own)."""
    return text.rstrip()


RULES = (first_line_only, trim_repeated_lines, stop_at_dedent, limit_lines, trim_line_suffix,
         match_indentation, strip_trailing)


def clean(text: str, where: Surroundings) -> str:
    """The completion to show, or "" when nothing worth showing is left."""
    for rule in RULES:
        text = rule(text, where)
        if not text.strip():
            return ""
    return text
