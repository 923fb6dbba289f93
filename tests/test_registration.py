"""Handlers register explicitly on the server they are given (`handlers.register`), never as a
side effect of importing a module: a bare server answers nothing of ours, and registering on
one server leaves another as it was."""

from __future__ import annotations

from lsprotocol import types

from lsp_server import handlers
from lsp_server.inline_completion import ACCEPT_COMPLETION
from lsp_server.inline_edit import ACCEPT_NEXT_EDIT, INLINE_EDIT, InlineEditParams
from lsp_server.server import DOCTOR, DOCUMENT, STATS, DiffusionServer

OURS = {types.TEXT_DOCUMENT_INLINE_COMPLETION, types.TEXT_DOCUMENT_COMPLETION,
        types.TEXT_DOCUMENT_CODE_ACTION, types.CODE_ACTION_RESOLVE, types.INITIALIZED,
        types.TEXT_DOCUMENT_DID_OPEN, STATS, DOCTOR, DOCUMENT, INLINE_EDIT}


def test_a_server_gets_every_handler_when_registered_and_none_on_import():
    bare = DiffusionServer()
    assert not OURS & set(bare.protocol.fm.features)
    assert (bare.protocol.checked_params, bare.protocol.experimental) == ({}, {})
    server = DiffusionServer()
    handlers.register(server)
    assert set(server.protocol.fm.features) >= OURS
    assert {ACCEPT_COMPLETION, ACCEPT_NEXT_EDIT} <= set(server.protocol.fm.commands)
    assert server.protocol.checked_params == {INLINE_EDIT: InlineEditParams}
    assert server.protocol.experimental["inlineEdit"]["method"] == INLINE_EDIT
    options = server.protocol.fm.feature_options[types.TEXT_DOCUMENT_COMPLETION]
    assert options.trigger_characters == [".", "(", " ", "\n"]
    assert not OURS & set(bare.protocol.fm.features)  # the other server is as it was
    assert (bare.protocol.checked_params, bare.protocol.experimental) == ({}, {})
