"""Next edit suggestions over LSP, wire-compatible with copilot-language-server
(docs/next-edits.md): `textDocument/copilotInlineEdit` and the notifications Copilot's clients
send. Thin handlers over lsp_server/next_edit.py (history, region, rewrite -> edits) and the
backend's `next_edit`; `register` registers them on a server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import msgspec

from diffusion_contract.edit_wire import EditPrompt
from lsp_server import context as ctx
from lsp_server import next_edit as nes
from lsp_server.backends import NextEditJob
from lsp_server.documents import encoding_name
from lsp_server.inline_completion import on_accept
from lsp_server.server import DiffusionServer

log = logging.getLogger("diffusion_lsp")

INLINE_EDIT = "textDocument/copilotInlineEdit"
DID_SHOW_INLINE_EDIT = "textDocument/didShowInlineEdit"
DID_SHOW_COMPLETION = "textDocument/didShowCompletion"
DID_PARTIALLY_ACCEPT = "textDocument/didPartiallyAcceptCompletion"
DID_FOCUS = "textDocument/didFocus"
DID_DISMISS = "diffusion/didDismiss"  # ours: a suggestion the user dismissed
ACCEPT_NEXT_EDIT = "diffusion-lsp.didAcceptNextEdit"
COMMENT_PREFIX = {"python": "#", "ruby": "#", "shellscript": "#", "r": "#", "lua": "--",
                  "sql": "--", "haskell": "--"}  # others: "//"
MAX_EDIT_TOKENS = 4096  # the rewritten region, at most (2 x the region + 32 below that)


class TextDocumentRef(msgspec.Struct):
    uri: str
    version: int | None = None


class Place(msgspec.Struct):
    line: int
    character: int


class InlineEditParams(msgspec.Struct):
    """`textDocument/copilotInlineEdit`'s params (other fields, e.g. sidekick's `context`, are
    ignored)."""

    textDocument: TextDocumentRef  # noqa: N815 - the wire's name
    position: Place


async def suggest(ls: DiffusionServer, uri: str, version: int | None,
                  position: Place) -> list[dict]:
    """The suggested edits ([] for none: not open, a stale version, nothing predicted, or an
    edit that would undo the user's). A newer request for the document supersedes this one;
    cancellation propagates."""
    began = time.perf_counter()
    ls.stats.count("nextEditRequests")
    task = asyncio.current_task()
    try:
        return await ls.under_policy(_suggest(ls, uri, version, position, task), [],
                                     f"next edit at {uri} {position}")
    finally:
        if ls.inflight_edits.get(uri) is task:
            del ls.inflight_edits[uri]
        ls.stats.next_edit_ms.append((time.perf_counter() - began) * 1e3)


async def _suggest(ls: DiffusionServer, uri: str, version: int | None, position: Place,
                   task: asyncio.Task | None) -> list[dict]:
    document = ls.open_document(uri)
    settings = ls.settings
    if (document is None or not settings.next_edit.enable
            or not settings.enabled_for(document.language_id)):
        return []
    if version is not None and document.version != version:
        ls.stats.count("nextEditStale")
        return []
    if ls.state != "ready" or ls.backend is None:
        ls.stats.count("notReady")
        return []
    raw = document.source
    if len(raw) > nes.MAX_DOCUMENT_CHARS:
        return []
    text = ctx.normalize_line_ends(raw)
    encoding = encoding_name(ls.workspace.position_encoding)
    try:
        cursor = ctx.locate(text, position.line, position.character, encoding)
    except ctx.PositionError as error:
        log.info("no next edit: %s", error)
        return []
    ls.supersede(ls.inflight_edits, uri, task)
    ls.memory.viewed.saw(uri, cursor.line)
    if settings.next_edit.backoff and not ls.edit_backoff.should_ask():
        ls.stats.count("nextEditSkipped")
        return []
    backend, options = ls.backend, settings.next_edit
    region = nes.editable_region(text, cursor.line, backend.count_tokens, options.lines_above,
                                 options.lines_below, options.region_tokens)
    history = ls.memory.histories.get(uri)
    if history is not None and history.text != text:
        history.observe(text)  # a change the server saw before its handler ran
    prompt = EditPrompt(
        ls.document_path(uri), text[:region.start], text[region.start:region.end],
        min(max(cursor.offset - region.start, 0), region.end - region.start),
        text[region.end:],
        history.diffs(options.history_edits) if history is not None else (),
        ls.memory.viewed.snippets(uri, ls.latest_text, ls.document_path,
                                  options.max_snippets, options.snippet_lines))
    job = NextEditJob(prompt, max_tokens=min(MAX_EDIT_TOKENS,
                                             2 * backend.count_tokens(prompt.region) + 32),
                      threshold=options.threshold, strategy=options.strategy,
                      comment=COMMENT_PREFIX.get(document.language_id or "", "//"),
                      document=f"{uri}#next-edit")
    outcome = await backend.next_edit(job)
    current = ls.open_document(uri)
    if current is None or current.version != document.version:
        return []
    changes = [] if outcome.region is None else nes.suggestion(
        text, region, outcome.region, history.latest() if history is not None else None)
    ls.edit_backoff.answered(bool(changes))
    ls.stats.count("nextEdits" if changes else "nextEditsEmpty")
    log.debug("next edit %s: %d change(s) (model %.0f ms, %d passes)",
              uri.rsplit("/", 1)[-1], len(changes), outcome.model_ms, outcome.steps)
    return lsp_edits(ls, uri, document.version, text, changes, encoding,
                     "\r\n" if "\r\n" in raw else "\n")


def lsp_edits(ls: DiffusionServer, uri: str, version: int, text: str,
              changes: list[nes.Change], encoding: str, line_end: str) -> list[dict]:
    """The changes as Copilot's inline edits, each with an accept command (an offered id)."""
    def units(prefix: str) -> int:
        return ctx.units_of(prefix, encoding)

    edits = []
    for change in changes:
        item = uuid.uuid4().hex
        ls.feedback.offer(item, "nextEdit", uri, nes.apply_changes(text, [change]))
        start = nes.position_of(text, change.start, units)
        end = nes.position_of(text, change.end, units)
        edits.append({
            "range": {"start": {"line": start[0], "character": start[1]},
                      "end": {"line": end[0], "character": end[1]}},
            "text": change.text.replace("\n", line_end),
            "textDocument": {"uri": uri, "version": version},
            "command": {"title": "Accept next edit", "command": ACCEPT_NEXT_EDIT,
                        "arguments": [item]}})
    return edits


def plain(value: Any) -> Any:
    """pygls' named tuples for untyped JSON, back into dicts and lists."""
    if hasattr(value, "_asdict"):
        return {key: plain(item) for key, item in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


async def on_inline_edit(ls: DiffusionServer, params: Any) -> dict:
    """`{textDocument: {uri, version}, position}` in, `{edits: [{range, text, textDocument:
    {uri, version}, command}]}` out (params were checked against InlineEditParams when the
    message was read)."""
    request = msgspec.convert(plain(params), InlineEditParams)
    edits = await suggest(ls, request.textDocument.uri, request.textDocument.version,
                          request.position)
    return {"edits": edits}


def on_show_inline_edit(ls: DiffusionServer, params: Any = None) -> None:
    ls.feedback.shown(nes.item_id(params))


def on_show_completion(ls: DiffusionServer, params: Any = None) -> None:
    ls.feedback.shown(nes.item_id(params))


def on_partial_accept(ls: DiffusionServer, params: Any = None) -> None:
    ls.feedback.accepted(nes.item_id(params), partial=True)


def on_dismiss(ls: DiffusionServer, params: Any = None) -> None:
    ls.feedback.rejected(nes.item_id(params))


def on_focus(ls: DiffusionServer, params: Any = None) -> None:
    """Copilot clients say which document has the focus (it is a viewed document)."""
    uri = getattr(getattr(params, "textDocument", None), "uri", None)
    if isinstance(uri, str) and ls.open_document(uri) is not None:
        ls.touch(uri)


def register(server: DiffusionServer) -> None:
    """Register the next-edit handlers on `server`: the request (its params checked against
    InlineEditParams as the message is read), the notifications, the accept command, and the
    `capabilities.experimental` entries Copilot's clients look for."""
    server.protocol.checked_params[INLINE_EDIT] = InlineEditParams
    server.protocol.experimental.update({
        "inlineEdit": {"method": INLINE_EDIT, "acceptCommand": ACCEPT_NEXT_EDIT},
        "diffusionLsp": {"nextEdits": True}})
    for method, handler in ((INLINE_EDIT, on_inline_edit),
                            (DID_SHOW_INLINE_EDIT, on_show_inline_edit),
                            (DID_SHOW_COMPLETION, on_show_completion),
                            (DID_PARTIALLY_ACCEPT, on_partial_accept), (DID_DISMISS, on_dismiss),
                            (DID_FOCUS, on_focus)):
        server.feature(method)(handler)
    server.command(ACCEPT_NEXT_EDIT)(on_accept)
