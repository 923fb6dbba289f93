"""Completions over LSP: `textDocument/inlineCompletion` (ghost text) and
`textDocument/completion` (a menu item). Thin handlers over completion.py (whether a request is
answered, the job), context.py (the text around the cursor cut to budget), postprocess.py (the
clean-up), suppress.py (what is never offered) and the backend.

Data flow per request: position -> cursor (negotiated encoding) -> type-along cache ->
supersede the document's older request -> debounce -> context cut to budget -> backend fills
the hole -> clean-up -> cache -> answer. Every failure answers "no items", is logged, and leaves
the server serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from lsprotocol import types

from lsp_server import context as ctx
from lsp_server import suppress
from lsp_server.backends import CompletionOutcome
from lsp_server.completion import Refusal, admit, completion_job
from lsp_server.documents import encoding_name
from lsp_server.postprocess import choose_multiline, clean, surroundings
from lsp_server.preview import PREVIEW, PreviewSink
from lsp_server.server import DiffusionServer

log = logging.getLogger("diffusion_lsp")

ACCEPT_COMPLETION = "diffusion-lsp.didAcceptCompletion"  # an inline completion's command
TRIGGER_CHARACTERS = [".", "(", " ", "\n"]


@dataclass
class Answer:
    text: str
    cursor: ctx.Cursor


async def answer(ls: DiffusionServer, uri: str, position: types.Position) -> Answer | None:
    """The completion at `position`, or None for no items. Cancellation propagates."""
    began = time.perf_counter()
    ls.stats.count("requests")
    task = asyncio.current_task()
    try:
        return await ls.under_policy(_answer(ls, uri, position, began, task), None,
                                     f"completion at {uri} {position}")
    finally:
        if ls.inflight.get(uri) is task:
            del ls.inflight[uri]


async def _answer(ls: DiffusionServer, uri: str, position: types.Position, began: float,
                  task: asyncio.Task | None) -> Answer | None:
    document = ls.open_document(uri)
    cursor = admit(uri, document, ls.settings, ls.state == "ready" and ls.backend is not None,
                   position.line, position.character,
                   encoding_name(ls.workspace.position_encoding))
    if isinstance(cursor, Refusal):
        return ls.refuse(cursor)
    ls.touch(uri)
    text = document.source
    cached = ls.cache.get(uri, text, cursor.offset)
    if cached is not None:
        ls.stats.count("cacheHits")
        finish(ls, began, None, uri, cached, cache_hit=True)
        return Answer(cached, cursor)
    ls.supersede(ls.inflight, uri, task)
    if ls.settings.completion.debounce_ms:
        await asyncio.sleep(ls.settings.completion.debounce_ms / 1000)
    sink = preview_sink(ls, uri, document.version, position, task) if (
        ls.settings.completion.preview) else None
    try:
        return await _fill(ls, uri, document, cursor, sink, began)
    finally:
        if sink is not None:
            sink.close()


def preview_sink(ls: DiffusionServer, uri: str, version: int | None, position: types.Position,
                 task: asyncio.Task | None) -> PreviewSink:
    def send(params: dict) -> None:
        ls.protocol.notify(PREVIEW, params)

    return PreviewSink(send, asyncio.get_running_loop(), task, uri, version, position.line,
                       position.character)


async def _fill(ls: DiffusionServer, uri: str, document: Any, cursor: ctx.Cursor,
                sink: PreviewSink | None, began: float) -> Answer | None:
    """The backend fills the hole at `cursor`; the text cleaned, cached, previewed."""
    settings, backend, text = ls.settings, ls.backend, document.source
    options = settings.completion
    multiline = choose_multiline(cursor.line_before, cursor.line_after, options.multiline)
    others = ctx.snippet_sources(uri, document.language_id, ls.recent,
                                 ls.workspace.text_documents)
    context = ctx.build_context(text, cursor, backend.count_tokens, settings.context,
                                others=others, language_id=document.language_id)
    outcome = await backend.complete(completion_job(
        context, multiline, options, uri, sink.report if sink is not None else None))
    cleaned = clean(outcome.text, surroundings(text, cursor, multiline, options.max_lines))
    problem = await asyncio.to_thread(
        suppress.completion_problem, text, cursor.offset, cleaned, document.language_id,
        outcome.confidence, min_confidence(ls), options.check_parse)
    if problem is not None:
        ls.stats.count(f"suppressed:{problem}")
        log.debug("not offered (%s, confidence %s): %r", problem, outcome.confidence, cleaned)
        cleaned = ""
    say_if_preview(ls)
    if sink is not None:
        sink.finish(outcome.steps, cleaned)
    ls.cache.put(uri, text, cursor.offset, cleaned)
    if ls.state == "ready":  # a failure shown in the status bar is over
        ls.status_message = f"ready: {ls.description}"
    finish(ls, began, outcome, uri, cleaned, snippets=context.snippets)
    return Answer(cleaned, cursor) if cleaned else None


def min_confidence(ls: DiffusionServer) -> float:
    """The confidence floor: the setting, else the model's own calibrated one."""
    floor = ls.settings.completion.min_confidence
    return floor if floor is not None else getattr(ls.backend, "min_confidence", 0.0)


def say_if_preview(ls: DiffusionServer) -> None:
    """The bundled model's first completion (offered, or held back as junk) comes with a word
    that it is a preview, and what gets a real model (once a session)."""
    notice = getattr(ls.backend, "preview_notice", None)
    if notice and notice not in ls.reported:
        ls.tell_user(notice, types.MessageType.Info, popup=True)


def finish(ls: DiffusionServer, began: float, outcome: CompletionOutcome | None, uri: str,
           text: str, cache_hit: bool = False, snippets: int = 0) -> None:
    """A completion answered: its latency recorded and the status bar updated."""
    latency = (time.perf_counter() - began) * 1e3
    ls.last_latency_ms = round(latency, 1)
    model_ms = outcome.model_ms if outcome is not None else None
    steps = outcome.steps if outcome is not None else None
    ls.stats.record(latency, model_ms, steps)
    ls.stats.count("completed" if text else "empty")
    log.debug("completion %s: %.1f ms (model %s ms, %s passes, %s tokens, cache hit %s, "
              "%d snippets): %r", uri.rsplit("/", 1)[-1], latency,
              f"{model_ms:.1f}" if model_ms is not None else "-", steps,
              outcome.tokens if outcome is not None else "-", cache_hit, snippets, text)
    ls.send_status()


async def on_inline_completion(ls: DiffusionServer, params: types.InlineCompletionParams
                               ) -> types.InlineCompletionList | None:
    found = await answer(ls, params.text_document.uri, params.position)
    if found is None:
        return types.InlineCompletionList(items=[])
    position = params.position
    item_id = uuid.uuid4().hex
    ls.feedback.offer(item_id, "completion", params.text_document.uri)
    item = types.InlineCompletionItem(
        insert_text=found.text, range=types.Range(start=position, end=position),
        command=types.Command(title="Accept completion", command=ACCEPT_COMPLETION,
                              arguments=[item_id]))
    return types.InlineCompletionList(items=[item])


async def on_completion(ls: DiffusionServer, params: types.CompletionParams
                        ) -> types.CompletionList:
    found = await answer(ls, params.text_document.uri, params.position)
    if found is None:
        return types.CompletionList(is_incomplete=True, items=[])
    position = params.position
    first_line = found.text.strip().split("\n", 1)[0]
    item = types.CompletionItem(
        label=first_line[:80] or found.text[:80],
        kind=types.CompletionItemKind.Text,
        detail="diffusion-lsp",
        documentation=types.MarkupContent(kind=types.MarkupKind.Markdown,
                                          value=f"```\n{found.text}\n```"),
        text_edit=types.TextEdit(range=types.Range(start=position, end=position),
                                 new_text=found.text),
        filter_text=found.cursor.line_before.lstrip() + found.text,
        sort_text="0",
        preselect=True,
    )
    return types.CompletionList(is_incomplete=True, items=[item])


def on_accept(ls: DiffusionServer, *arguments: Any) -> None:
    """A suggestion's command: the client applied it (its first argument: the offered id)."""
    ls.feedback.accepted(arguments[0] if arguments and isinstance(arguments[0], str) else None)


def register(server: DiffusionServer) -> None:
    """Register the completion handlers on `server`, and the accept command of its items."""
    server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION,
                   types.InlineCompletionOptions())(on_inline_completion)
    server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(
        trigger_characters=TRIGGER_CHARACTERS))(on_completion)
    server.command(ACCEPT_COMPLETION)(on_accept)
