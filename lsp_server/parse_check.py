"""Whether a suggestion would break a file that parses. Pure functions, no LSP types.

Python is judged by its own parser (`ast`); other languages by tree-sitter's official grammars
(one small PyPI package each, compiled in: nothing is downloaded at run time), for the
languages in GRAMMARS. A language without a parser here, a file that did not parse before the
suggestion (the user is in the middle of typing), or a file over MAX_CHARS is not judged: only
"it parsed, and with the suggestion it does not" suppresses a suggestion.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import threading
import warnings
from collections import OrderedDict
from functools import cache

MAX_CHARS = 400_000  # larger files are not judged (parsing one costs more than it saves)
REMEMBERED = 16  # texts whose verdict is kept (the text before a completion repeats)
PYTHON = ("python",)
# LSP language id -> (module of tree-sitter's official grammar, its function for the language)
GRAMMARS: dict[str, tuple[str, str]] = {
    "javascript": ("tree_sitter_javascript", "language"),
    "javascriptreact": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "typescriptreact": ("tree_sitter_typescript", "language_tsx"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
}

_verdicts: OrderedDict[tuple[str, str], bool | None] = OrderedDict()
_lock = threading.Lock()  # callers run in threads; a parser and the verdicts are shared


def judged(language: str | None) -> bool:
    """Whether files of this LSP language id can be judged here."""
    return language in PYTHON or (language in GRAMMARS and _parser(language) is not None)


@cache
def _parser(language: str):
    """A tree-sitter parser for the language, or None when its grammar is not installed."""
    try:
        from tree_sitter import Language, Parser

        module, function = GRAMMARS[language]
        return Parser(Language(getattr(importlib.import_module(module), function)()))
    except (ImportError, AttributeError, ValueError):
        return None


def _python_parses(text: str) -> bool:
    try:
        with warnings.catch_warnings():  # invalid escape sequences and the like: still parses
            warnings.simplefilter("ignore")
            ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def parses(text: str, language: str | None) -> bool | None:
    """Whether `text` parses as `language`; None when it cannot be judged here."""
    if language is None or len(text) > MAX_CHARS or not judged(language):
        return None
    with _lock:
        return _parses(text, language)


def _parses(text: str, language: str) -> bool:
    key = (language, hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                     digest_size=16).hexdigest())
    if key in _verdicts:
        _verdicts.move_to_end(key)
        return _verdicts[key]
    if language in PYTHON:
        verdict = _python_parses(text)
    else:
        verdict = not _parser(language).parse(text.encode("utf-8", "surrogatepass")
                                              ).root_node.has_error
    _verdicts[key] = verdict
    while len(_verdicts) > REMEMBERED:
        _verdicts.popitem(last=False)
    return verdict


def breaks_parse(before: str, after: str, language: str | None) -> bool:
    """Whether `after` (the file with the suggestion) fails to parse where `before` (the file
    without it) parsed. False when the language cannot be judged or `before` did not parse."""
    if after == before or parses(before, language) is not True:
        return False
    return parses(after, language) is False


def inserted(text: str, offset: int, completion: str) -> str:
    """`text` with `completion` inserted at `offset` (code points), as the editor would."""
    return text[:offset] + completion + text[offset:]
