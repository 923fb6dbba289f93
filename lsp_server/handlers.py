"""The handlers of the methods every server answers (initialize, configuration, documents,
`shutdown`, the server's own `diffusion/*` requests), and `register`, which registers them with
those of completions, the hole action and next edits on a server. Nothing registers on import.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lsprotocol import types

from lsp_server import context as ctx
from lsp_server import hole_action, inline_completion, inline_edit
from lsp_server.server import DOCTOR, DOCUMENT, STATS, DiffusionServer

log = logging.getLogger("diffusion_lsp")


def on_initialize(ls: DiffusionServer, params: types.InitializeParams) -> None:
    ls.event_loop = asyncio.get_running_loop()
    for message in ls.pending_reports:
        ls.report_from_any_thread(message)
    ls.pending_reports.clear()
    ls.apply_settings(params.initialization_options)


def on_initialized(ls: DiffusionServer, params: types.InitializedParams) -> None:
    ls.start_backend()


def on_configuration(ls: DiffusionServer, params: types.DidChangeConfigurationParams) -> None:
    if ls.apply_settings(params.settings):
        log.info("model settings changed: restarting the backend")
        ls.start_backend()


def on_open(ls: DiffusionServer, params: types.DidOpenTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.touch(uri)
    ls.memory.opened(uri, ls.document_path(uri),
                     ctx.normalize_line_ends(params.text_document.text))


def on_change(ls: DiffusionServer, params: types.DidChangeTextDocumentParams) -> None:
    uri = params.text_document.uri
    document = ls.open_document(uri)
    if document is not None:
        text = ctx.normalize_line_ends(document.source)
        ls.memory.changed(uri, text, ls.document_path(uri))
        ls.feedback.document_changed(uri, text)


def on_close(ls: DiffusionServer, params: types.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    for inflight in (ls.inflight, ls.inflight_edits):
        task = inflight.pop(uri, None)
        if task is not None:
            task.cancel()
    ls.cache.forget(uri)
    ls.memory.closed(uri)
    ls.feedback.closed(uri)
    if uri in ls.recent:
        ls.recent.remove(uri)


def on_stats(ls: DiffusionServer, params: Any = None) -> dict:
    return ls.stats_snapshot()


async def on_doctor(ls: DiffusionServer, params: Any = None) -> dict:
    """`diffusion-lsp doctor --json`'s report for this server's settings and environment (the
    PATH an editor gave it), with the server's own state and the report in words (`text`):
    what the editors' status commands show."""
    from lsp_server.doctor import describe, diagnose

    remote = ls.settings.remote if ls.settings.backend == "remote" else None
    report = await asyncio.to_thread(diagnose, remote)
    snapshot = ls.stats_snapshot()
    report["server"] = {key: snapshot.get(key) for key in (
        "state", "model", "device", "engineRestarts", "outOfMemory")} | {
        "backend": ls.settings.backend, "message": ls.status_message}
    server = report["server"]
    report["text"] = (f"server      {server['state']} ({ls.settings.backend} backend): "
                      f"{server['message'] or server['model'] or '-'}\n" + describe(report))
    return report


def on_document(ls: DiffusionServer, params: Any = None) -> dict | None:
    """The server's copy of a document (debugging and the fuzz suite): `{"uri"}` in,
    `{"uri", "version", "text"}` out, or null when it is not open."""
    uri = getattr(params, "uri", None)
    document = ls.open_document(uri) if isinstance(uri, str) else None
    if document is None:
        return None
    return {"uri": uri, "version": document.version, "text": document.source}


def on_shutdown(ls: DiffusionServer, params: Any = None) -> None:
    for task in list(ls.inflight.values()):
        task.cancel()
    engine = getattr(ls.backend, "engine", None)
    if engine is not None:
        engine.close(timeout=2.0)


def register(server: DiffusionServer) -> None:
    """Register every handler on `server`: these, then those of completions, the hole action
    and next edits."""
    for method, handler in (
            (types.INITIALIZE, on_initialize), (types.INITIALIZED, on_initialized),
            (types.WORKSPACE_DID_CHANGE_CONFIGURATION, on_configuration),
            (types.TEXT_DOCUMENT_DID_OPEN, on_open), (types.TEXT_DOCUMENT_DID_CHANGE, on_change),
            (types.TEXT_DOCUMENT_DID_CLOSE, on_close), (STATS, on_stats), (DOCTOR, on_doctor),
            (DOCUMENT, on_document), (types.SHUTDOWN, on_shutdown)):
        server.feature(method)(handler)
    for module in (inline_completion, hole_action, inline_edit):
        module.register(server)
