"""The "Fill N holes" code action over LSP: `textDocument/codeAction` lists it (cheap: no model
runs), `codeAction/resolve` fills every hole jointly. Thin handlers over holes.py (markers,
the job, the edits), suppress.py and the backend.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from lsprotocol import types

from lsp_server import context as ctx
from lsp_server import holes, suppress
from lsp_server.backends import BackendError
from lsp_server.completion import MAX_DOCUMENT_CHARS
from lsp_server.documents import encoding_name
from lsp_server.server import DiffusionServer

log = logging.getLogger("diffusion_lsp")


def wants_rewrite(only: list[str] | None) -> bool:
    """Whether a codeAction request's `only` admits refactor.rewrite actions (LSP: a kind
    admits its sub-kinds)."""
    kind = types.CodeActionKind.RefactorRewrite.value
    return not only or any(kind == want or kind.startswith(f"{want}.") for want in only)


def hole_actions(ls: DiffusionServer, uri: str, where: types.Range,
                 only: list[str] | None) -> list[types.CodeAction]:
    """The action over `where` (an empty range: the enclosing function), or none."""
    document = ls.open_document(uri)
    if document is None or not wants_rewrite(only):
        return []
    text = document.source
    if len(text) > MAX_DOCUMENT_CHARS:
        return []
    try:
        span = holes.range_offsets(text, where, encoding_name(ls.workspace.position_encoding))
    except ctx.PositionError as error:
        log.info("no hole action: %s", error)
        return []
    data = holes.offer(uri, document.version, text, span, ls.settings)
    if data is None:
        return []
    count = len(data.markers)
    return [types.CodeAction(title=f"Fill {count} hole{'s' if count != 1 else ''}",
                             kind=types.CodeActionKind.RefactorRewrite,
                             data=msgspec.to_builtins(data))]


async def resolve_holes(ls: DiffusionServer, action: types.CodeAction) -> types.CodeAction:
    """The action with its edit: every hole filled jointly. With no edit when the document
    changed since the action was listed (or changes while the model runs), when the action's
    data is not ours, or when the model is not ready."""
    data = holes.read_action_data(action.data)
    if data is None:
        log.warning("codeAction/resolve: not a hole action's data: %.200r", action.data)
        return action
    document = ls.open_document(data.uri)
    if document is None or not holes.still_current(document.source, document.version, data):
        log.info("hole action for %s: the document changed since it was offered", data.uri)
        return action
    if ls.state != "ready" or ls.backend is None:
        ls.tell_user("the model is not ready yet: no holes filled")
        return action
    text, settings, markers = document.source, ls.settings, data.listed()
    try:
        outcome = await ls.backend.fill_holes(
            holes.holes_job(text, data, ls.backend.count_tokens, settings))
    except BackendError as error:
        ls.backend_failed(error)
        return action
    document = ls.open_document(data.uri)
    if document is None or not holes.still_current(document.source, document.version, data):
        log.info("hole action for %s: the document changed while the model ran", data.uri)
        return action
    problem = await asyncio.to_thread(
        suppress.fill_problem, text, holes.filled_text(text, markers, outcome.texts),
        document.language_id, settings.completion.check_parse)
    if problem is not None:
        ls.stats.count(f"suppressed:{problem}")
        log.info("hole fills for %s not offered (%s): %r", data.uri, problem, outcome.texts)
        return action
    edits = holes.text_edits(text, markers, outcome.texts,
                             encoding_name(ls.workspace.position_encoding))
    log.info("filled %d of %d holes in %s (%d passes, %.0f ms)", len(edits), len(markers),
             data.uri, outcome.steps, outcome.model_ms)
    action.edit = types.WorkspaceEdit(
        changes={data.uri: edits},
        document_changes=[types.TextDocumentEdit(
            text_document=types.OptionalVersionedTextDocumentIdentifier(
                uri=data.uri, version=data.version), edits=list(edits))])
    return action


def on_code_action(ls: DiffusionServer, params: types.CodeActionParams
                   ) -> list[types.CodeAction]:
    return hole_actions(ls, params.text_document.uri, params.range, params.context.only)


async def on_code_action_resolve(ls: DiffusionServer, params: types.CodeAction
                                 ) -> types.CodeAction:
    return await resolve_holes(ls, params)


def register(server: DiffusionServer) -> None:
    """Register the hole action's handlers on `server`."""
    server.feature(types.TEXT_DOCUMENT_CODE_ACTION, types.CodeActionOptions(
        code_action_kinds=[types.CodeActionKind.RefactorRewrite],
        resolve_provider=True))(on_code_action)
    server.feature(types.CODE_ACTION_RESOLVE)(on_code_action_resolve)
