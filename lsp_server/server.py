"""The language server's state and its wire: the JSON-RPC error policy (`Protocol`), the
transport, the status the editor shows, settings and the backend's lifecycle, and the error
policy every request runs under (`under_policy`, `refuse`). Every failure answers "no items"
(or an LSP error for a malformed message), is logged, and leaves the server serving.

The methods are answered by thin handlers over pure functions, each registered explicitly
(`lsp_server/handlers.py`'s `register`): completions (inline_completion.py), the hole action
(hole_action.py), next edits (inline_edit.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import unquote

import cattrs
import msgspec
from cattrs.errors import ClassValidationError
from lsprotocol import types
from lsprotocol.types import ResponseErrorMessage
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcInvalidRequest
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import (
    JsonRPCNotification,
    JsonRPCRequestMessage,
    JsonRPCResponseMessage,
)
from pygls.protocol.language_server import lsp_method

from lsp_server import context as ctx
from lsp_server import next_edit as nes
from lsp_server import transport
from lsp_server.backends import Backend, BackendError, make_backend
from lsp_server.cache import CompletionCache
from lsp_server.completion import Refusal
from lsp_server.documents import Workspace
from lsp_server.settings import Settings, merge
from lsp_server.stats import Stats

log = logging.getLogger("diffusion_lsp")
T = TypeVar("T")

NAME = "diffusion-lsp"
VERSION = "0.1.0"
STATUS = "diffusion/status"
STATS = "diffusion/stats"
DOCUMENT = "diffusion/document"
DOCTOR = "diffusion/doctor"
RECENT_DOCUMENTS = 8  # documents remembered for snippets (a ring, most recent first)
RELOAD_KEYS = ("backend", "model", "remote")  # settings whose change restarts the backend


def envelope_problem(value: Any) -> str | None:
    """Why `value` is not a JSON-RPC 2.0 message LSP can carry, or None when it is one."""
    if isinstance(value, list):
        return "batches are not part of LSP"
    if not isinstance(value, dict):
        return "a message must be a JSON object"
    if value.get("jsonrpc") != "2.0":
        return f'"jsonrpc" must be "2.0", not {json.dumps(value.get("jsonrpc"))[:20]}'
    if "id" in value and transport.readable_id(value) is None:
        return "an id must be an integer or a string"
    if "method" in value and not isinstance(value["method"], str):
        return "a method must be a string"
    if "method" not in value and not ("id" in value and ("result" in value or "error" in value)):
        return "neither a request, a notification nor a response"
    return None


def invalid_params_reason(error: Exception) -> str:
    """One line saying which params were wrong (cattrs' nested errors, flattened)."""
    if isinstance(error, ClassValidationError):
        return "; ".join(cattrs.transform_error(error)[:3])
    return str(error) or type(error).__name__


class InvalidParams(Exception):
    """A message whose params do not decode into the method's types."""


class Protocol(LanguageServerProtocol):
    """pygls' protocol with a JSON-RPC 2.0 error policy: every request whose id can be read
    gets exactly one response (an error for a malformed one, InvalidRequest after `shutdown`),
    anything else unreadable gets an error with `"id": null`, and each problem is one log
    line. Messages arrive from `transport.pump` through `receive`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stopped = False  # `exit` came: the transport stops reading
        self.exit_code = 1  # LSP: 0 only when `exit` follows `shutdown`
        # filled when handlers register (lsp_server/inline_edit.py): the params a method's
        # message must decode into, and what `initialize` answers in `capabilities.experimental`
        self.checked_params: dict[str, type] = {}
        self.experimental: dict[str, Any] = {}

    @property
    def workspace(self) -> Workspace:
        """pygls' workspace, made into one holding LSP-line-end `Document`s on first use."""
        workspace = super().workspace
        if not isinstance(workspace, Workspace):
            self._workspace = workspace = Workspace.like(workspace)
        return workspace

    def receive(self, value: Any) -> None:
        msg_id = transport.readable_id(value)
        problem = envelope_problem(value)
        if problem is not None:
            log.warning("invalid message (id %s): %s", msg_id, problem)
            self.send_error(msg_id, JsonRpcInvalidRequest.CODE, f"invalid request: {problem}")
            return
        is_request = "method" in value and "id" in value
        if self._shutdown and is_request:
            log.warning("request %s %s after shutdown: refused", msg_id, value["method"])
            self.send_error(msg_id, JsonRpcInvalidRequest.CODE, "the server is shut down")
            return
        try:
            message = self.structure_message(value)
        except InvalidParams as error:
            log.warning("%s %s: invalid params: %s", value.get("method", "response"),
                        msg_id if msg_id is not None else "", error)
            if is_request:
                self.send_error(msg_id, JsonRpcInvalidParams.CODE, f"invalid params: {error}")
            return
        self.handle_message(message)

    def reply_problem(self, problem: transport.Problem) -> None:
        if problem.reply:
            log.warning("unreadable message: %s", problem.reason)
            self.send_error(problem.msg_id, problem.code, problem.reason)

    def send_error(self, msg_id: Any, code: int, message: str) -> None:
        """An error response; `msg_id` None is sent as `"id": null` (pygls would leave it out)."""
        self._send_data({"jsonrpc": "2.0", "id": msg_id,
                         "error": {"code": code, "message": message}})

    def _execute_handler(self, msg_id, handler, callback, args=None, kwargs=None):
        """pygls files the future of every notification whose handler is a generator (its own
        didOpen/didChange/didClose) in `_request_futures` under a random id, and nothing ever
        removes it: about 1.5 KB per edit for as long as the server runs (found by the soak).
        A notification's future is forgotten once it is done."""
        if callback == self._check_handler_result:  # a notification: no answer will pop it
            check = callback

            def forget(future) -> None:
                self._request_futures.pop(msg_id, None)
                check(future)

            callback = forget
        super()._execute_handler(msg_id, handler, callback, args, kwargs)

    def structure_message(self, data: dict[str, Any]):
        """pygls' decoding of a checked message into lsprotocol types, without its
        traceback per failure; params may be omitted where the method's type allows it (our
        own methods take any)."""
        if "id" in data and "error" in data:
            kind = ResponseErrorMessage
        elif "id" in data and "method" in data:
            kind = self.get_message_type(data["method"]) or JsonRPCRequestMessage
        elif "id" in data:
            kind = self._result_types.pop(data["id"], None) or JsonRPCResponseMessage
        else:
            kind = self.get_message_type(data["method"]) or JsonRPCNotification
        if kind in (JsonRPCRequestMessage, JsonRPCNotification):
            data = {"params": None, **data}
            checked = self.checked_params.get(data.get("method", ""))
            if checked is not None:
                try:
                    msgspec.convert(data["params"], checked)
                except msgspec.ValidationError as error:
                    raise InvalidParams(str(error)) from None
        try:
            return self._converter.structure(data, kind)
        except Exception as error:  # noqa: BLE001 - whatever cattrs raises, one line
            raise InvalidParams(invalid_params_reason(error)) from None

    def _handle_cancel_notification(self, msg_id: Any) -> None:
        """Cancel a running request; one already answered is normal (LSP), not a warning."""
        future = self._request_futures.pop(msg_id, None)
        if future is None:
            log.debug("cancel for %s, already answered", msg_id)
        elif future.cancel():
            log.debug("cancelled request %s", msg_id)

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        """pygls' initialize, plus `experimental` under `capabilities.experimental`."""
        result = yield from super().lsp_initialize(params)
        result.capabilities.experimental = dict(self.experimental) or None
        return result

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args) -> None:
        """Stop reading; the process exits with 0 after `shutdown`, else 1 (LSP)."""
        self.exit_code = 0 if self._shutdown else 1
        self.stopped = True

    def is_open(self, uri: str, method: str) -> bool:
        """Whether `uri` is open; when not, one warning instead of pygls' KeyError traceback."""
        if unquote(uri) in self.workspace.text_documents:
            return True
        log.warning("%s for %s, which is not open: ignored", method, uri)
        return False

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        """pygls' didChange, for open documents only (`is_open`)."""
        if self.is_open(params.text_document.uri, "didChange"):
            yield from super().lsp_text_document__did_change(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        """pygls' didClose, for open documents only (`is_open`)."""
        if self.is_open(params.text_document.uri, "didClose"):
            yield from super().lsp_text_document__did_close(params)


class DiffusionServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__(NAME, VERSION, protocol_cls=Protocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.settings = Settings()
        self.backend: Backend | None = None
        self.state = "starting"  # starting | loading | ready | error | disabled
        self.status_message = ""
        self.description: str | None = None
        self.stats = Stats()
        self.cache = CompletionCache(self.settings.cache_size)
        self.inflight: dict[str, asyncio.Task] = {}
        self.inflight_edits: dict[str, asyncio.Task] = {}  # next-edit requests, per document
        self.memory = nes.Memory()  # edit histories and viewed places (next edits)
        self.edit_backoff = nes.Backoff()  # next edits: ask a model that predicts none less
        self.feedback = nes.Feedback()  # shown / accepted / rejected suggestions
        self.recent: list[str] = []  # uris, most recent first
        self.reported: set[str] = set()  # problems already shown to the user
        self.last_latency_ms: float | None = None
        self._load_task: asyncio.Task | None = None
        self.model_override: dict = {}  # from the command line; wins over the editor
        self.event_loop: asyncio.AbstractEventLoop | None = None  # set once serving
        self.pending_reports: list[str] = []  # problems found before the loop ran

    # -- transports and errors -----------------------------------------------------------------

    def report_server_error(self, error: Exception, source) -> None:
        """pygls' hook for a failure outside our handlers: one log line."""
        log.error("server error (%s): %s", getattr(source, "__name__", source), error)

    async def run(self, read, writer) -> int:
        """Serve one client: messages from `read()` chunks, answers to `writer`, until `exit`
        or the end of input; then stop the backend. Returns the exit code (LSP)."""
        self.protocol.set_writer(writer)
        try:
            await transport.pump(read, self.protocol)
        except (BrokenPipeError, ConnectionResetError):
            log.error("the client went away")
        finally:
            await self.close()
        return self.protocol.exit_code

    async def close(self) -> None:
        for task in list(self.inflight.values()):
            task.cancel()
        if self._load_task is not None:
            self._load_task.cancel()
        if self.backend is not None:
            backend, self.backend = self.backend, None
            await backend.close()

    def start_io(self, stdin=None, stdout=None) -> int:  # type: ignore[override]
        """Serve over stdio with our transport (see lsp_server/transport.py)."""
        fd = (stdin or sys.stdin.buffer).fileno()
        writer = StdoutWriter(stdout or sys.stdout.buffer)

        async def main() -> int:
            return await self.run(transport.stdin_chunks(fd), writer)

        return asyncio.run(main())

    # -- status ---------------------------------------------------------------------------------

    def set_state(self, state: str, message: str = "") -> None:
        self.state, self.status_message = state, message
        self.send_status()

    def send_status(self) -> None:
        try:
            self.protocol.notify(STATUS, {
                "state": self.state, "message": self.status_message, "model": self.description,
                "device": self._device(), "lastLatencyMs": self.last_latency_ms})
        except Exception as error:  # noqa: BLE001 - no client transport yet (tests, shutdown)
            log.debug("status not sent: %s", error)

    def _device(self) -> str | None:
        engine = getattr(self.backend, "engine", None)
        return engine.model.device.type if engine is not None else None

    def tell_user(self, message: str, kind: types.MessageType = types.MessageType.Warning,
                  popup: bool = False) -> None:
        """Log `message` and show it in the editor, once per distinct message."""
        log.warning("%s", message)
        if message in self.reported:
            return
        self.reported.add(message)
        params_log = types.LogMessageParams(type=kind, message=f"{NAME}: {message}")
        self.window_log_message(params_log)
        if popup:
            self.window_show_message(types.ShowMessageParams(type=kind,
                                                             message=f"{NAME}: {message}"))

    # -- settings and the backend ---------------------------------------------------------------

    def apply_settings(self, raw: Any) -> bool:
        """Merge editor settings; returns whether the backend must restart."""
        before = msgspec.to_builtins(self.settings)
        settings, problems = merge(self.settings, raw)
        settings, more = merge(settings, self.model_override)
        for problem in problems + more:
            self.tell_user(f"setting ignored: {problem}", popup=True)
        self.settings = settings
        self.cache.resize(settings.cache_size)
        logging.getLogger().setLevel(settings.log_level.upper())
        after = msgspec.to_builtins(settings)
        if not settings.enable:
            self.set_state("disabled", "completions are disabled")
        elif self.state == "disabled":
            self.set_state("ready" if self.backend is not None else "starting")
        return any(before[key] != after[key] for key in RELOAD_KEYS)

    def start_backend(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        self._load_task = asyncio.ensure_future(self._start_backend())

    async def _start_backend(self) -> None:
        old, self.backend = self.backend, None
        if old is not None:
            await old.close()
        self.cache = CompletionCache(self.settings.cache_size)
        backend = make_backend(self.settings)
        token = str(uuid.uuid4())
        progress = await self._begin_progress(token)
        self.set_state("loading", "loading the model")

        def report(message: str) -> None:
            log.info("%s", message)
            if progress:
                self.work_done_progress.report(token, types.WorkDoneProgressReport(
                    message=message))

        try:
            began = time.perf_counter()
            self.description = await backend.start(self.settings, report)
            log.info("ready: %s (%.1f s)", self.description, time.perf_counter() - began)
            self.backend = backend
            self.set_state("ready" if self.settings.enable else "disabled",
                           f"ready: {self.description}")
        except Exception as error:  # noqa: BLE001 - BackendError, or a bug in a backend
            if not isinstance(error, BackendError):
                log.exception("the %s backend did not start", backend.name)
            self.set_state("error", str(error))
            self.tell_user(f"no completions: {error}", types.MessageType.Error, popup=True)
        finally:
            if progress:
                self.work_done_progress.end(token, types.WorkDoneProgressEnd(
                    message=self.status_message))

    async def _begin_progress(self, token: str) -> bool:
        window = self.client_capabilities.window
        if not (window and window.work_done_progress):
            return False
        try:
            await asyncio.wait_for(self.work_done_progress.create_async(token), 5)
        except Exception as error:  # noqa: BLE001 - the client refused or did not answer
            log.info("no progress reporting: %s", error)
            return False
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(
            title="Loading model", message=self.settings.model.path or "bundled model",
            cancellable=False))
        return True

    # -- requests -------------------------------------------------------------------------------

    def open_document(self, uri: str):
        """The open document at `uri`, or None (pygls keys documents by unquoted URI)."""
        return self.workspace.text_documents.get(unquote(uri))

    def touch(self, uri: str) -> None:
        if uri in self.recent:
            self.recent.remove(uri)
        self.recent.insert(0, uri)
        del self.recent[RECENT_DOCUMENTS:]

    def supersede(self, inflight: dict[str, asyncio.Task], uri: str,
                  task: asyncio.Task | None) -> None:
        """A newer request for `uri` cancels the one of its kind in flight (counted as
        superseded) and takes its place in `inflight`."""
        older = inflight.get(uri)
        if older is not None and older is not task and not older.done():
            older.cancel()
            self.stats.count("superseded")
        if task is not None:
            inflight[uri] = task

    async def under_policy(self, work: Awaitable[T], miss: T, what: str) -> T:
        """`work`'s answer under the error policy (STYLE 4): a cancellation is counted and
        propagates; a busy backend (its queue full: a burst of requests) is counted as `busy`
        and answered with `miss` quietly; a backend failure is reported (`backend_failed`),
        anything else logged; both are counted as errors and answered with `miss`."""
        try:
            return await work
        except asyncio.CancelledError:
            self.stats.count("cancelled")
            raise
        except BackendError as error:
            if error.kind == "busy":  # a burst beyond the engine's queue: no items, no alarm
                self.stats.count("busy")
                log.debug("%s: %s", what, error)
                return miss
            self.stats.count("errors")
            self.backend_failed(error)
            return miss
        except Exception:
            self.stats.count("errors")
            log.exception("%s failed", what)
            return miss

    def refuse(self, refusal: Refusal) -> None:
        """A request answered with no items, without the model: counted in `diffusion/stats`,
        logged, and told to the user when it must act. The one place that does so."""
        if refusal.counter is not None:
            self.stats.count(refusal.counter)
        if refusal.tell_user:
            self.tell_user(refusal.detail)
        else:
            log.log(refusal.level, "no items: %s", refusal.detail)

    def document_path(self, uri: str) -> str:
        """A readable path for prompts: the workspace-relative path, else the file's path."""
        path = unquote(uri.split("://", 1)[-1]) if "://" in uri else uri.split(":", 1)[-1]
        root = self.workspace.root_path
        if root and path.startswith(root.rstrip("/") + "/"):
            return path[len(root.rstrip("/")) + 1:]
        return path

    def latest_text(self, uri: str) -> str | None:
        """The open document's text with "\\n" line ends, or None."""
        document = self.open_document(uri)
        return ctx.normalize_line_ends(document.source) if document is not None else None

    def backend_failed(self, error: BackendError) -> None:
        """A completion failed: the user sees it once (log panel, and the status bar until the
        next completion succeeds); a backend that stopped also pops up and serves no more; an
        engine that restarted itself pops up once (its message never changes)."""
        if error.kind == "restarted":
            self.tell_user(str(error), types.MessageType.Warning, popup=True)
            self.set_state(self.state, f"{error.kind}: {error}")
            return
        if error.kind == "stopped":
            self.set_state("error", str(error))
            self.tell_user(f"no completions: {error}", types.MessageType.Error, popup=True)
            return
        self.tell_user(f"completion failed: {error}")
        self.set_state(self.state, f"{error.kind}: {error}")

    def report_from_any_thread(self, message: str) -> None:
        """`tell_user` (with a pop-up) from any thread, e.g. a log handler that lost its file;
        held until the event loop runs."""
        if self.event_loop is None:
            self.pending_reports.append(message)
            return
        self.event_loop.call_soon_threadsafe(self.tell_user, message,
                                             types.MessageType.Warning, True)

    def stats_snapshot(self) -> dict:
        snapshot = self.stats.snapshot()
        snapshot["feedback"] = self.feedback.snapshot()
        snapshot.update(state=self.state, modelReady=self.state == "ready",
                        model=self.description, device=self._device(),
                        cacheEntries=len(self.cache), inflight=len(self.inflight))
        engine = getattr(self.backend, "engine", None)
        if engine is not None:
            snapshot["forwardPasses"] = engine.forward_passes
            snapshot["outOfMemory"] = engine.out_of_memory
            snapshot["engineRestarts"] = engine.restarts
        return snapshot


SERVING: list[DiffusionServer] = []  # the server of the client served now (one at a time)
UNREPORTED: list[str] = []  # process-wide problems found while no server was serving


def report_to_user(message: str) -> None:
    """Tell the user of the client served now (from any thread), e.g. that the log file was
    lost; held for the next server when none is serving yet."""
    if SERVING:
        SERVING[0].report_from_any_thread(message)
    else:
        UNREPORTED.append(message)
