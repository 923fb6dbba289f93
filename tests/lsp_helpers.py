"""What the LSP tests of several files share: a server whose client keeps its previews, the
code actions and edits of "Fill N holes", next-edit requests and the remote backend's settings
(test files import it from here, never from each other)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from lsprotocol import types

from benchmarks.lsp_client import plain, running_server
from tests.remote_standin import KEY

HOLES = (
    "def area(w, h):\n"
    "    if w < 0:\n"
    "        ...\n"
    "    # TODO: compute the area\n"
    "    return result\n"
)

@contextlib.asynccontextmanager
async def previewing_server(settings: dict) -> AsyncIterator:
    """The server with `settings`, its client keeping every preview in `client.previews`."""
    async with running_server(settings) as client:
        client.previews = []

        @client.feature("diffusion/preview")
        def on_preview(params) -> None:
            client.previews.append(plain(params))

        yield client


async def actions(client, uri: str, start: tuple[int, int], end: tuple[int, int],
                  only: list[str] | None = None):
    return await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=types.Range(start=types.Position(line=start[0], character=start[1]),
                          end=types.Position(line=end[0], character=end[1])),
        context=types.CodeActionContext(diagnostics=[], only=only)))


def apply(text: str, edits) -> str:
    lines = text.split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    for e in sorted(edits, key=lambda e: (e.range.start.line, e.range.start.character),
                    reverse=True):
        a = offsets[e.range.start.line] + e.range.start.character
        b = offsets[e.range.end.line] + e.range.end.character
        text = text[:a] + e.new_text + text[b:]
    return text


async def inline_edit(client, uri: str, version: int | None, line: int, character: int,
                      **extra) -> list[dict]:
    params = {"textDocument": {"uri": uri, "version": version},
              "position": {"line": line, "character": character}, **extra}
    result = plain(await client.protocol.send_request_async("textDocument/copilotInlineEdit",
                                                            params))
    return result["edits"]


def remote_options(url: str, key: str = KEY, timeout_ms: int = 2000) -> dict:
    return {"backend": "remote", "completion": {"debounceMs": 0},
            "remote": {"url": url, "apiKey": key, "timeoutMs": timeout_ms, "retries": 1}}
