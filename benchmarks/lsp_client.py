"""Drive the real server process over stdio with pytest-lsp's client (tests and the
end-to-end latency benchmark; needs the `test` extra)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from lsprotocol import types
from pytest_lsp import LanguageClient, client_capabilities
from pytest_lsp.client import make_test_lsp_client

READY_TIMEOUT_S = 120.0


def plain(value):
    """pygls decodes unknown JSON objects into named tuples; turn them back into dicts."""
    if hasattr(value, "_asdict"):
        return {key: plain(item) for key, item in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


async def stats(client: LanguageClient) -> dict:
    return plain(await client.protocol.send_request_async("diffusion/stats", None))


async def wait_ready(client: LanguageClient, timeout: float = READY_TIMEOUT_S) -> dict:
    """Poll diffusion/stats until the model is ready (or loading failed)."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = await stats(client)
        if snapshot["state"] in ("ready", "error", "disabled"):
            return snapshot
        if time.monotonic() > deadline:
            raise TimeoutError(f"model not ready after {timeout} s: {snapshot}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running_server(init_options: dict | None, client_name: str = "visual-studio-code",
                         extra_args: tuple[str, ...] = (), wait: bool = True,
                         env: dict[str, str] | None = None,
                         module: str = "diffusion_lsp") -> AsyncIterator[LanguageClient]:
    """A started, initialised server process (`python -m MODULE serve EXTRA_ARGS`); waits until
    the model is ready unless `wait` is false."""
    client = make_test_lsp_client()
    client.statuses = collections.deque(maxlen=100)

    @client.feature("diffusion/status")
    def on_status(params) -> None:  # the server's status notifications, newest last
        client.statuses.append(plain(params))

    await client.start_io(sys.executable, "-m", module, "serve", *extra_args,
                          env=env)
    try:
        client.initialize_result = await client.initialize_session(types.InitializeParams(
            capabilities=client_capabilities(client_name),
            initialization_options=init_options))
        if wait:
            await wait_ready(client)
        yield client
        await asyncio.wait_for(client.shutdown_session(), 30)
    finally:
        process = client._server
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(client.stop(), 10)


def open_document(client: LanguageClient, uri: str, text: str, language: str = "python",
                  version: int = 1) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id=language, version=version,
                                             text=text)))


def edit(client: LanguageClient, uri: str, version: int, line: int, character: int,
         new_text: str, end: tuple[int, int] | None = None) -> None:
    start = types.Position(line=line, character=character)
    stop = types.Position(line=end[0], character=end[1]) if end else start
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(start=start, end=stop), text=new_text)]))


async def inline(client: LanguageClient, uri: str, line: int, character: int):
    return await client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Automatic)))


def file_uri(path: str | Path) -> str:
    return Path(path).resolve().as_uri()
