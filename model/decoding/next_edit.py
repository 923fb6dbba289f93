"""Next edits by diffusion: re-denoise parts of the editable region given the edit history.

The region is rewritten as one or more holes, each filled by the ordinary infill (the engine's
`infill(prefix, suffix, options)`), with everything else of the file on both sides of it. Two
ways to choose the holes (`STRATEGIES`):

- `region` (the default): the whole region is one hole whose length starts from the region's
  own (± slack, the sampler's variable length adds or ends tokens as needed). The model writes
  the region again, seeing the file above and below it.
- `doubt`: only the tokens the edit history puts in doubt are remasked, in the
  spirit of edit-style denoising (Seed Diffusion, arXiv:2508.02193, trains a model to remask
  and correct the tokens it doubts): where the latest edit replaced an identifier, each later
  use of the old name in the region becomes a hole the length of that name (± slack); where
  the edit added an argument inside `name(...)`, each other call `name(...)` in the region gets
  an empty hole before its `)` that may stay empty. Everything else keeps its tokens, so a
  small model cannot damage the rest of the region. The model's own per-token doubt (remask
  where its confidence in the present token is low) needs a forward pass over the region from
  the sampler; see docs/next-edits.md.

The history is laid out where the model sees it: as comment lines above the file's text in the
prefix (`history_comment`), oldest first, so the latest edit is nearest the code.

Pure planning (`plan`, `assemble`) is separate from running (`rewrite`), so the service and the
local backend share it. Nothing here knows LSP.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

STRATEGIES = ("doubt", "region")
DEFAULT_STRATEGY = "region"  # equal exact match, a quarter of the latency (docs/next-edits.md)
CHARS_PER_TOKEN = 3.5  # token estimate where no tokenizer is at hand (the service's gateway)
COMMENT_BY_SUFFIX = {".py": "#", ".rb": "#", ".sh": "#", ".r": "#", ".lua": "--", ".sql": "--",
                     ".hs": "--"}  # the history's comment prefix; other files: "//"
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\S")
REGION_SLACK = 1.25  # a rewritten region may be this much longer than the old one ...
REGION_SLACK_TOKENS = 8  # ... plus this many tokens
WORD_SLACK_TOKENS = 3  # a remasked name may grow by this many tokens
ARGUMENT_TOKENS = 8  # an argument added at a call site, at most
MAX_HOLES = 6  # doubted places re-denoised per request, the nearest to the cursor
HISTORY_LINES = 24  # history comment lines, at most (the latest kept)
KEYWORDS = frozenset({  # never taken for a renamed identifier
    "def", "class", "return", "if", "else", "elif", "for", "while", "in", "is", "not", "and",
    "or", "import", "from", "as", "with", "try", "except", "finally", "lambda", "None", "True",
    "False", "pass", "self"})

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Site:
    """What the rewrite sees: the file as above + region + below, the cursor (an offset into
    the region), the edit history (unified diffs, oldest first) and the comment prefix of the
    language (for laying out the history)."""

    above: str
    region: str
    cursor: int
    below: str
    history: tuple[str, ...] = ()
    comment: str = "#"


@dataclass(frozen=True)
class Hole:
    """Replace region[start:end] with at most `max_tokens` tokens (possibly none when
    `may_be_empty`)."""

    start: int
    end: int
    max_tokens: int
    may_be_empty: bool = False


def comment_for(path: str) -> str:
    """The line comment of the language `path`'s suffix says ("//" when unknown)."""
    dot = path.rfind(".")
    return COMMENT_BY_SUFFIX.get(path[dot:].lower(), "//") if dot >= 0 else "//"


def estimate_tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + 1 if text else 0


def diff_pairs(diff: str) -> list[tuple[str, str]]:
    """(removed, added) line blocks of one unified diff, in order."""
    pairs: list[tuple[str, str]] = []
    removed: list[str] = []
    added: list[str] = []
    for line in diff.split("\n"):
        if line.startswith(("---", "+++", "@@")):
            continue
        if line.startswith("-"):
            if added:
                pairs.append(("\n".join(removed), "\n".join(added)))
                removed, added = [], []
            removed.append(line[1:])
        elif line.startswith("+"):
            added.append(line[1:])
        else:
            if removed or added:
                pairs.append(("\n".join(removed), "\n".join(added)))
            removed, added = [], []
    if removed or added:
        pairs.append(("\n".join(removed), "\n".join(added)))
    return pairs


def renames(history: tuple[str, ...]) -> dict[str, str]:
    """Identifiers the latest edits replaced, old -> new (the latest edit wins)."""
    found: dict[str, str] = {}
    for diff in history:
        for removed, added in diff_pairs(diff):
            old, new = TOKEN.findall(removed), TOKEN.findall(added)
            matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes():
                if (tag == "replace" and i2 - i1 == 1 and j2 - j1 == 1
                        and IDENTIFIER.fullmatch(old[i1]) and IDENTIFIER.fullmatch(new[j1])
                        and old[i1] not in KEYWORDS):
                    found.pop(new[j1], None)  # a rename back is no rename
                    found[old[i1]] = new[j1]
    return {old: new for old, new in found.items() if old != new}


def grown_calls(history: tuple[str, ...]) -> set[str]:
    """Names whose parenthesised argument list the latest edits made longer, e.g. `area`
    for `def area(w, h)` -> `def area(w, h, d)`."""
    names: set[str] = set()
    for diff in history:
        for removed, added in diff_pairs(diff):
            for match in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\(([^()]*)\)", added):
                name, arguments = match.group(1), match.group(2)
                before = re.search(re.escape(name) + r"\(([^()]*)\)", removed)
                if before is not None and arguments.count(",") > before.group(1).count(","):
                    names.add(name)
    return names


def doubted_holes(site: Site, count_tokens: CountTokens) -> list[Hole]:
    """The holes of the `doubt` strategy (see the module's docstring), in region order."""
    holes: list[Hole] = []
    for old, _new in renames(site.history).items():
        for match in re.finditer(rf"(?<![A-Za-z0-9_]){re.escape(old)}(?![A-Za-z0-9_])",
                                 site.region):
            holes.append(Hole(match.start(), match.end(),
                              count_tokens(old) + WORD_SLACK_TOKENS))
    for name in grown_calls(site.history):
        for match in re.finditer(rf"(?<![A-Za-z0-9_.]){re.escape(name)}\(", site.region):
            line_start = site.region.rfind("\n", 0, match.start()) + 1
            if re.match(r"\s*(def|class)\s", site.region[line_start:]):
                continue  # the definition itself is what the user edited
            close = matching_paren(site.region, match.end() - 1)
            if close is not None:
                holes.append(Hole(close, close, ARGUMENT_TOKENS, may_be_empty=True))
    holes.sort(key=lambda hole: hole.start)
    kept: list[Hole] = []
    for hole in holes:  # no overlapping holes
        if not kept or hole.start >= kept[-1].end and hole.start != kept[-1].start:
            kept.append(hole)
    nearest = sorted(kept, key=lambda hole: abs(hole.start - site.cursor))[:MAX_HOLES]
    return sorted(nearest, key=lambda hole: hole.start)


def matching_paren(text: str, open_at: int) -> int | None:
    depth = 0
    for index in range(open_at, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    return None


def plan(site: Site, strategy: str, count_tokens: CountTokens) -> list[Hole]:
    """The holes to fill, in region order; [] when there is nothing to re-denoise."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown next-edit strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if strategy == "doubt":
        return doubted_holes(site, count_tokens)
    tokens = count_tokens(site.region)
    return [Hole(0, len(site.region), max(1, int(tokens * REGION_SLACK) + REGION_SLACK_TOKENS))]


def history_comment(history: tuple[str, ...], comment: str) -> str:
    """The history as comment lines for the top of the prompt (oldest first; at most
    HISTORY_LINES, the latest kept); "" without history."""
    lines = [line for diff in history for line in diff.rstrip("\n").split("\n")
             if not line.startswith(("---", "+++"))]
    if not lines:
        return ""
    lines = lines[-HISTORY_LINES:]
    return "".join(f"{comment} {line}\n" for line in ["recent edits:", *lines])


def hole_context(site: Site, region: str, hole: Hole) -> tuple[str, str]:
    """(prefix, suffix) around `hole` in the region as it stands now."""
    prefix = history_comment(site.history, site.comment) + site.above + region[:hole.start]
    return prefix, region[hole.end:] + site.below


Fill = Callable[[str, str, Hole], Awaitable[tuple[str, int]]]  # prefix, suffix -> text, steps


async def rewrite(site: Site, strategy: str, count_tokens: CountTokens,
                  fill: Fill) -> tuple[str | None, int]:
    """The region rewritten (None when no hole was planned) and the forward passes spent.
    Holes are filled one after another from the top, each seeing the fills above it."""
    holes = plan(site, strategy, count_tokens)
    if not holes:
        return None, 0
    region, shift, steps = site.region, 0, 0
    for hole in holes:
        moved = Hole(hole.start + shift, hole.end + shift, hole.max_tokens, hole.may_be_empty)
        prefix, suffix = hole_context(site, region, moved)
        text, passes = await fill(prefix, suffix, moved)
        steps += passes
        if moved.may_be_empty is False and not text.strip():
            text = region[moved.start:moved.end]  # a name is not removed: keep it
        if "\n" in text and "\n" not in region[moved.start:moved.end] and strategy == "doubt":
            text = text.split("\n", 1)[0]  # a remasked name stays on its line
        region = region[:moved.start] + text + region[moved.end:]
        shift += len(text) - (hole.end - hole.start)
    return region, steps
