"""Drive the real server process over stdio with pygls' language client (the tests, and the
end-to-end benchmarks: `bench lsp`, `bench typing`, `bench next-edit`, the soak). Runtime
dependencies only: pygls and lsprotocol."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lsprotocol import types
from lsprotocol.converters import get_converter
from pygls.exceptions import FeatureNotificationError, FeatureRequestError, JsonRpcMethodNotFound
from pygls.lsp.client import LanguageClient as PyglsClient

READY_TIMEOUT_S = 120.0
STATUS = "diffusion/status"  # the server's status notifications (lsp_server/server.py)
CONVERTER = get_converter()

# What an editor offers in `initialize` (LSP's JSON). The server reads the work-done progress
# and the position encodings (pygls picks the first it supports; without any, UTF-16); the
# rest declares the features this client uses.
_EDITOR = {
    "window": {"workDoneProgress": True, "showDocument": {"support": True},
               "showMessage": {"messageActionItem": {"additionalPropertiesSupport": True}}},
    "workspace": {"applyEdit": True, "configuration": True, "workspaceFolders": True,
                  "didChangeConfiguration": {"dynamicRegistration": True}},
    "textDocument": {
        "synchronization": {"dynamicRegistration": True, "didSave": True},
        "completion": {"completionItem": {"snippetSupport": True}},
        "inlineCompletion": {},
        "codeAction": {"dataSupport": True, "isPreferredSupport": True,
                       "resolveSupport": {"properties": ["edit"]},
                       "codeActionLiteralSupport": {"codeActionKind": {"valueSet": [
                           "", "quickfix", "refactor", "refactor.rewrite", "source"]}}},
    },
}
CLIENTS = {
    "visual-studio-code": _EDITOR,  # positions in UTF-16, LSP's default
    "neovim": {**_EDITOR, "general": {"positionEncodings": ["utf-8", "utf-16", "utf-32"]}},
}
PROGRESS_KINDS = {"begin": types.WorkDoneProgressBegin, "report": types.WorkDoneProgressReport,
                  "end": types.WorkDoneProgressEnd}
# A handler of ours that failed, or a method this client does not handle: not the server's fault.
HANDLER_ERRORS = (FeatureNotificationError, FeatureRequestError, JsonRpcMethodNotFound)


def client_capabilities(client_name: str) -> types.ClientCapabilities:
    """The capabilities `client_name` (a key of CLIENTS) offers in `initialize`."""
    if client_name not in CLIENTS:
        raise ValueError(f"unknown client {client_name!r}; known: {', '.join(CLIENTS)}")
    return CONVERTER.structure(CLIENTS[client_name], types.ClientCapabilities)


def plain(value):
    """pygls decodes unknown JSON objects into named tuples; turn them back into dicts."""
    if hasattr(value, "_asdict"):
        return {key: plain(item) for key, item in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


# What the client keeps of each message the server sends it (pygls passes the client as `ls`).


def _show_message(ls: LanguageClient, params: types.ShowMessageParams) -> None:
    ls.messages.append(params)


def _log_message(ls: LanguageClient, params: types.LogMessageParams) -> None:
    ls.log_messages.append(params)


def _progress_created(ls: LanguageClient, params: types.WorkDoneProgressCreateParams) -> None:
    ls.progress_reports.setdefault(params.token, [])


def _progress(ls: LanguageClient, params: types.ProgressParams) -> None:
    value = plain(params.value)
    kind = PROGRESS_KINDS[value["kind"]]
    ls.progress_reports.setdefault(params.token, []).append(CONVERTER.structure(value, kind))


def _status(ls: LanguageClient, params) -> None:
    ls.statuses.append(plain(params))


HANDLERS = {types.WINDOW_SHOW_MESSAGE: _show_message, types.WINDOW_LOG_MESSAGE: _log_message,
            types.WINDOW_WORK_DONE_PROGRESS_CREATE: _progress_created,
            types.PROGRESS: _progress, STATUS: _status}


class LanguageClient(PyglsClient):
    """pygls' client, keeping what the server told it: its window messages and log messages,
    its work-done progress by token, its status notifications (newest last); the capabilities
    it was offered; the server's stderr goes to ours."""

    def __init__(self) -> None:
        super().__init__("diffusion-lsp-client", "1")
        self.capabilities: types.ClientCapabilities | None = None
        self.initialize_result: types.InitializeResult | None = None
        self.messages: list[types.ShowMessageParams] = []
        self.log_messages: list[types.LogMessageParams] = []
        self.progress_reports: dict[types.ProgressToken, list[Any]] = {}
        self.statuses: collections.deque[dict] = collections.deque(maxlen=100)
        self.error: Exception | None = None  # the server broke the protocol
        self._stderr: asyncio.Task | None = None
        for method, handler in HANDLERS.items():
            self.feature(method)(handler)

    async def start_io(self, cmd: str, *args, **kwargs) -> None:
        await super().start_io(cmd, *args, **kwargs)
        self._stderr = asyncio.create_task(forward_stderr(self._server))

    async def stop(self) -> None:
        if self._stderr is not None:
            self._stderr.cancel()
        await super().stop()

    def report_server_error(self, error: Exception, source) -> None:
        """pygls' hook for what went wrong reading the server: unless only a handler of ours
        failed, fail every request still waiting and end the server."""
        if source in HANDLER_ERRORS:
            return
        self.error = error
        for future in self.protocol._request_futures.values():
            if not future.done():
                future.set_exception(RuntimeError(f"{source.__name__}: {error}"))
        if self._server is not None and self._server.returncode is None:
            self._server.terminate()

    async def initialize_session(self, params: types.InitializeParams) -> types.InitializeResult:
        """`initialize` (with this process' id), then `initialized`."""
        self.capabilities = params.capabilities
        if params.process_id is None:
            params.process_id = os.getpid()
        self.initialize_result = await self.initialize_async(params)
        self.initialized(types.InitializedParams())
        return self.initialize_result

    async def shutdown_session(self) -> None:
        """`shutdown`, `exit`, and wait for the process; nothing when the session is broken."""
        if self.error is not None or self.capabilities is None:
            return
        await self.shutdown_async(None)
        self.exit(None)
        if self._server is not None:
            await self._server.wait()


async def forward_stderr(server: asyncio.subprocess.Process | None) -> None:
    """Copy the server's stderr to ours, line by line, until it closes (a pipe nobody reads
    would block the server once full)."""
    if server is None or server.stderr is None:
        return
    while line := await server.stderr.readline():
        sys.stderr.buffer.write(line)
        sys.stderr.flush()


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
                         module: str = "diffusion_lsp",
                         checkout: Path | None = None) -> AsyncIterator[LanguageClient]:
    """A started, initialised server process (`python -m MODULE serve EXTRA_ARGS`); waits until
    the model is ready unless `wait` is false. With `checkout`, the server is that source
    checkout's (run from it, first on its path: e.g. a worktree of an older commit)."""
    client = LanguageClient()
    where = {}
    if checkout is not None:
        base = env if env is not None else dict(os.environ)
        where = {"cwd": str(checkout), "env": {**base, "PYTHONPATH": str(checkout)}}
    else:
        where = {"env": env}
    await client.start_io(sys.executable, "-m", module, "serve", *extra_args, **where)
    try:
        await client.initialize_session(types.InitializeParams(
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
