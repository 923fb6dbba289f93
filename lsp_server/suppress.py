"""Whether a suggestion is offered at all: never one the model was unsure of (below the
confidence floor), never one that turns a file that parsed into one that does not
(`parse_check`). Pure functions; the server counts each reason in `diffusion/stats`."""

from __future__ import annotations

from lsp_server.parse_check import breaks_parse, inserted

LOW_CONFIDENCE = "low_confidence"
BREAKS_PARSE = "breaks_parse"
REASONS = (LOW_CONFIDENCE, BREAKS_PARSE)


def completion_problem(text: str, offset: int, completion: str, language: str | None,
                       confidence: float | None, floor: float, check_parse: bool) -> str | None:
    """Why `completion`, inserted at `offset` of `text`, is not offered (a REASONS entry), or
    None to offer it. `confidence`: the least sure token's (None: the backend does not say,
    and the floor does not apply)."""
    if not completion:
        return None
    if confidence is not None and confidence < floor:
        return LOW_CONFIDENCE
    if check_parse and breaks_parse(text, inserted(text, offset, completion), language):
        return BREAKS_PARSE
    return None


def fill_problem(text: str, filled: str, language: str | None, check_parse: bool) -> str | None:
    """Why a document whose holes were filled (`filled`) is not offered, or None."""
    return BREAKS_PARSE if check_parse and breaks_parse(text, filled, language) else None
