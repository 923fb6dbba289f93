"""A completion request as plain values: whether it is answered at all (and why not), and the
job the backend gets. Pure functions; lsp_server/inline_completion.py runs them for the
server (cache, supersede, debounce, backend, clean-up).

A request gets no items, without asking the model, when its document is not open, completions
are off for its language, the model is not ready, the document is too large, the position does
not exist, or the text around the cursor looks binary. Each such miss is a `Refusal`: what
the log says, what `diffusion/stats` counts and whether the user is told.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from lsp_server import context as ctx
from lsp_server.backends.base import CompletionJob
from lsp_server.settings import CompletionSettings, Settings

MAX_DOCUMENT_CHARS = 20_000_000  # larger documents get no completions
BINARY_WINDOW = 4096  # characters on each side of the cursor looked at for NUL bytes

NOT_OPEN = "not_open"
DISABLED = "disabled"
NOT_READY = "not_ready"
TOO_LARGE = "too_large"
NO_SUCH_POSITION = "no_such_position"
BINARY = "binary"


@dataclass(frozen=True)
class Refusal:
    """Why a request gets no items: `reason` (one of the names above), the words for the log
    (or for the user), the `diffusion/stats` counter it adds to (None: not counted), the log
    level, and whether the user is told (once per distinct message)."""

    reason: str
    detail: str
    counter: str | None = "rejected"
    level: int = logging.INFO
    tell_user: bool = False


def admit(uri: str, document: ctx.OpenDocument | None, settings: Settings, ready: bool,
          line: int, character: int, encoding: str) -> ctx.Cursor | Refusal:
    """The cursor of a completion request at (line, character) of `uri`, or why it gets no
    items. `ready`: whether the model is loaded and serving; `encoding`: the negotiated
    position encoding."""
    if document is None:
        return Refusal(NOT_OPEN, f"{uri} is not open")
    if not settings.enabled_for(document.language_id):
        return Refusal(DISABLED, f"completions are off for {document.language_id or uri}",
                       counter=None, level=logging.DEBUG)
    if not ready:
        return Refusal(NOT_READY, "the model is not ready", counter="notReady",
                       level=logging.DEBUG)
    text = document.source
    if len(text) > MAX_DOCUMENT_CHARS:
        return Refusal(TOO_LARGE, f"{uri} is too large for completions ({len(text):,} "
                       "characters)", tell_user=True)
    try:
        cursor = ctx.locate(text, line, character, encoding)
    except ctx.PositionError as error:
        return Refusal(NO_SUCH_POSITION, str(error))
    near = text[max(0, cursor.offset - BINARY_WINDOW):cursor.offset + BINARY_WINDOW]
    if ctx.looks_binary(near):
        return Refusal(BINARY, f"{uri} looks binary")
    return cursor


def completion_job(context: ctx.Context, multiline: bool, options: CompletionSettings,
                   document: str, on_step: Callable | None = None) -> CompletionJob:
    """What the backend fills for a hole with `context` around it: a multi-line or a one-line
    completion (its own token budget, ending at the line's end), under the sampler settings."""
    return CompletionJob(
        prefix=context.prefix, suffix=context.suffix,
        max_tokens=options.max_tokens if multiline else options.max_tokens_single_line,
        single_line=not multiline, stop=tuple(options.stop), threshold=options.threshold,
        tokens_per_step=options.tokens_per_step, sampler=options.sampler, document=document,
        on_step=on_step)
