"""What the model sees of a benchmark prompt: prefix and suffix cut to token budgets by lines.

A small model was trained on short sequences, so long prompts must be cut. Cutting the prefix
to its last N tokens loses what matters most: in a trial here, a 180-token prefix dropped the
`def` line in 131 of 200 HumanEval prompts. So the prefix is cut by whole lines, and the
signature of the enclosing function and the first and last lines of its docstring are always
kept; after them come the lines nearest the hole, then the docstring from its top. Lines are
dropped, never split, so the text the model sees stays valid Python around the hole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

CountTokens = Callable[[str], int]

DEF_LINE = re.compile(r"^\s*(async\s+)?def\s")
DOCSTRING_OPEN = re.compile(r"^\s*[rRuUbB]{0,2}(\"\"\"|''')")
MAX_SIGNATURE_LINES = 12  # a `def` whose header runs longer than this keeps only its first line
MAX_HEADERS = 2  # the nearest function and the one around it


def indentation(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def enclosing_defs(lines: Sequence[str]) -> list[int]:
    """Indices of the `def` lines around the end of `lines`, nearest first: the nearest `def`,
    then each `def` above it indented less. At most MAX_HEADERS."""
    found: list[int] = []
    for index in range(len(lines) - 1, -1, -1):
        if len(found) >= MAX_HEADERS:
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
    """The part of `prefix` the model sees, within about `budget` tokens.

    Kept, in order of priority: the cursor's own line; the enclosing `def` headers with the
    first and last lines of their docstrings; the lines nearest the hole (a contiguous run
    upwards); the docstring lines from the top. The header is kept even when it alone exceeds
    the budget.
    """
    if count_tokens(prefix) <= budget:
        return prefix
    lines = prefix.split("\n")
    current, above = lines[-1], lines[:-1]
    cost = {}

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
