"""The language server: inline completions (and plain completions) over LSP, from a backend.

Data flow per request: position -> cursor (negotiated encoding) -> type-along cache ->
supersede the document's older request -> debounce -> context cut to budget -> backend fills
the hole -> clean-up -> cache -> answer. Every failure answers "no items" (or an LSP error for
a malformed message), is logged, and leaves the server serving.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
from lsp_server import holes, suppress, transport
from lsp_server import next_edit as nes
from lsp_server.backends import Backend, BackendError, CompletionJob, HolesJob, make_backend
from lsp_server.cache import CompletionCache
from lsp_server.documents import Workspace, encoding_name
from lsp_server.postprocess import Surroundings, choose_multiline, clean, detect_indent_unit
from lsp_server.preview import PREVIEW, PreviewSink
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
MAX_DOCUMENT_CHARS = 20_000_000  # larger documents get no completions
RECENT_DOCUMENTS = 8  # documents remembered for snippets (a ring, most recent first)
BELOW_LINES = 8  # lines after the cursor's line the clean-up compares against
RELOAD_KEYS = ("backend", "model", "remote")  # settings whose change restarts the backend
ACCEPT_COMPLETION = "diffusion-lsp.didAcceptCompletion"  # an inline completion's command
# filled by the modules that handle more methods (lsp_server/inline_edit.py): the params a
# method's message must decode into, `capabilities.experimental`, commands and their handlers
CHECKED_PARAMS: dict[str, type] = {}
EXPERIMENTAL: dict[str, Any] = {}
COMMANDS: list[tuple[str, Callable]] = []


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
            checked = CHECKED_PARAMS.get(data.get("method", ""))
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
        """pygls' initialize, plus EXPERIMENTAL under `capabilities.experimental`."""
        result = yield from super().lsp_initialize(params)
        result.capabilities.experimental = dict(EXPERIMENTAL) or None
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


@dataclass
class Answer:
    text: str
    cursor: ctx.Cursor


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

    # -- completions ----------------------------------------------------------------------------

    def open_document(self, uri: str):
        """The open document at `uri`, or None (pygls keys documents by unquoted URI)."""
        return self.workspace.text_documents.get(unquote(uri))

    def touch(self, uri: str) -> None:
        if uri in self.recent:
            self.recent.remove(uri)
        self.recent.insert(0, uri)
        del self.recent[RECENT_DOCUMENTS:]

    async def answer(self, uri: str, position: types.Position) -> Answer | None:
        """The completion at `position`, or None for no items. Cancellation propagates."""
        began = time.perf_counter()
        self.stats.count("requests")
        task = asyncio.current_task()
        try:
            return await self.under_policy(self._answer(uri, position, began, task), None,
                                           f"completion at {uri} {position}")
        finally:
            if self.inflight.get(uri) is task:
                del self.inflight[uri]

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
        propagates; a backend failure is reported (`backend_failed`), anything else logged;
        both are counted as errors and answered with `miss`."""
        try:
            return await work
        except asyncio.CancelledError:
            self.stats.count("cancelled")
            raise
        except BackendError as error:
            self.stats.count("errors")
            self.backend_failed(error)
            return miss
        except Exception:
            self.stats.count("errors")
            log.exception("%s failed", what)
            return miss

    async def _answer(self, uri: str, position: types.Position, began: float,
                      task: asyncio.Task | None) -> Answer | None:
        document = self.open_document(uri)
        if document is None:
            log.info("no items: %s is not open", uri)
            self.stats.count("rejected")
            return None
        settings = self.settings
        if not settings.enabled_for(document.language_id):
            return None
        if self.state != "ready" or self.backend is None:
            self.stats.count("notReady")
            return None
        text = document.source
        if len(text) > MAX_DOCUMENT_CHARS:
            self.tell_user(f"{uri} is too large for completions ({len(text):,} characters)")
            self.stats.count("rejected")
            return None
        encoding = encoding_name(self.workspace.position_encoding)
        try:
            cursor = ctx.locate(text, position.line, position.character, encoding)
        except ctx.PositionError as error:
            log.info("no items: %s", error)
            self.stats.count("rejected")
            return None
        near = text[max(0, cursor.offset - 4096):cursor.offset + 4096]
        if ctx.looks_binary(near):
            log.info("no items: %s looks binary", uri)
            self.stats.count("rejected")
            return None
        self.touch(uri)
        cached = self.cache.get(uri, text, cursor.offset)
        if cached is not None:
            self.stats.count("cacheHits")
            self._finish(began, None, uri, cached, cache_hit=True)
            return Answer(cached, cursor)

        self.supersede(self.inflight, uri, task)
        if settings.completion.debounce_ms:
            await asyncio.sleep(settings.completion.debounce_ms / 1000)
        sink = self.preview_sink(uri, document.version, position, task) if (
            settings.completion.preview) else None
        try:
            return await self._fill(uri, document, text, cursor, sink, began)
        finally:
            if sink is not None:
                sink.close()

    def preview_sink(self, uri: str, version: int | None, position: types.Position,
                     task: asyncio.Task | None) -> PreviewSink:
        def send(params: dict) -> None:
            self.protocol.notify(PREVIEW, params)

        return PreviewSink(send, asyncio.get_running_loop(), task, uri, version, position.line,
                           position.character)

    async def _fill(self, uri: str, document, text: str, cursor: ctx.Cursor,
                    sink: PreviewSink | None, began: float) -> Answer | None:
        """The backend fills the hole at `cursor`; the text cleaned, cached, previewed."""
        settings = self.settings
        backend = self.backend
        multiline = choose_multiline(cursor.line_before, cursor.line_after,
                                     settings.completion.multiline)
        others = [(name, doc.source) for name, doc in self._neighbours(uri, document)]
        context = ctx.build_context(
            text, cursor, backend.count_tokens, settings.context.prefix_tokens,
            settings.context.suffix_tokens, settings.context.snippet_tokens, others,
            settings.context.max_snippets, settings.context.snippet_lines, document.language_id)
        completion = settings.completion
        job = CompletionJob(
            prefix=context.prefix, suffix=context.suffix,
            max_tokens=completion.max_tokens if multiline else completion.max_tokens_single_line,
            single_line=not multiline, stop=tuple(completion.stop),
            threshold=completion.threshold, tokens_per_step=completion.tokens_per_step,
            sampler=completion.sampler, document=uri,
            on_step=sink.report if sink is not None else None)
        outcome = await backend.complete(job)
        below_start = text.find("\n", cursor.offset)
        below = text[below_start + 1:below_start + 1 + 4096].split("\n")[:BELOW_LINES] if (
            below_start >= 0) else []
        lines_near = text[max(0, cursor.offset - 8192):cursor.offset + 8192].split("\n")
        where = Surroundings(cursor.line_before, cursor.line_after, tuple(below),
                             detect_indent_unit(lines_near), multiline,
                             completion.max_lines)
        cleaned = clean(outcome.text, where)
        problem = await asyncio.to_thread(
            suppress.completion_problem, text, cursor.offset, cleaned, document.language_id,
            outcome.confidence, self.min_confidence(), completion.check_parse)
        if problem is not None:
            self.stats.count(f"suppressed:{problem}")
            log.debug("not offered (%s, confidence %s): %r", problem, outcome.confidence,
                      cleaned)
            cleaned = ""
        self.say_if_preview()
        if sink is not None:
            sink.finish(outcome.steps, cleaned)
        self.cache.put(uri, text, cursor.offset, cleaned)
        if self.state == "ready":  # a failure shown in the status bar is over
            self.status_message = f"ready: {self.description}"
        self._finish(began, outcome, uri, cleaned, snippets=context.snippets)
        return Answer(cleaned, cursor) if cleaned else None

    def min_confidence(self) -> float:
        """The confidence floor: the setting, else the model's own calibrated one."""
        floor = self.settings.completion.min_confidence
        return floor if floor is not None else getattr(self.backend, "min_confidence", 0.0)

    def say_if_preview(self) -> None:
        """The bundled model's first completion (offered, or held back as junk) comes with a
        word that it is a preview, and what gets a real model (once a session)."""
        notice = getattr(self.backend, "preview_notice", None)
        if notice and notice not in self.reported:
            self.tell_user(notice, types.MessageType.Info, popup=True)

    # -- several holes: the "Fill N holes" code action ----------------------------------------

    def hole_actions(self, uri: str, where: types.Range,
                     only: list[str] | None) -> list[types.CodeAction]:
        """The action over `where` (an empty range: the enclosing function), or none. Cheap:
        no model runs until the editor resolves the action."""
        document = self.open_document(uri)
        if document is None or not wants_rewrite(only):
            return []
        text = document.source
        if len(text) > MAX_DOCUMENT_CHARS:
            return []
        encoding = encoding_name(self.workspace.position_encoding)
        try:
            span = holes.range_offsets(text, where, encoding)
        except ctx.PositionError as error:
            log.info("no hole action: %s", error)
            return []
        patterns, _ = compiled_patterns(tuple(self.settings.holes.patterns))
        markers, dropped = holes.find_markers(text, *span, patterns)
        if dropped:
            log.info("%d overlapping hole marker(s) in %s left out", dropped, uri)
        if not markers or len(markers) > self.settings.holes.max_holes:
            return []
        data = holes.ActionData(uri, document.version, [(m.start, m.end) for m in markers],
                                [text[m.start:m.end] for m in markers])
        count = len(markers)
        return [types.CodeAction(title=f"Fill {count} hole{'s' if count != 1 else ''}",
                                 kind=types.CodeActionKind.RefactorRewrite,
                                 data=msgspec.to_builtins(data))]

    async def resolve_holes(self, action: types.CodeAction) -> types.CodeAction:
        """The action with its edit: every hole filled jointly. With no edit when the document
        changed since the action was listed (or changes while the model runs), when the
        action's data is not ours, or when the model is not ready."""
        data = holes.read_action_data(action.data)
        if data is None:
            log.warning("codeAction/resolve: not a hole action's data: %.200r", action.data)
            return action
        document = self.open_document(data.uri)
        if document is None or not holes.still_current(document.source, document.version, data):
            log.info("hole action for %s: the document changed since it was offered", data.uri)
            return action
        if self.state != "ready" or self.backend is None:
            self.tell_user("the model is not ready yet: no holes filled")
            return action
        text, backend, settings = document.source, self.backend, self.settings
        markers = [holes.Marker(start, end, "listed") for start, end in data.markers]
        job = HolesJob(
            pieces=tuple(holes.pieces_for(text, markers, backend.count_tokens,
                                          settings.context.prefix_tokens,
                                          settings.context.suffix_tokens)),
            markers=tuple(data.texts), max_tokens=settings.holes.max_tokens,
            threshold=settings.completion.threshold,
            tokens_per_step=settings.completion.tokens_per_step,
            sampler=settings.completion.sampler)
        try:
            outcome = await backend.fill_holes(job)
        except BackendError as error:
            self.backend_failed(error)
            return action
        document = self.open_document(data.uri)
        if document is None or not holes.still_current(document.source, document.version, data):
            log.info("hole action for %s: the document changed while the model ran", data.uri)
            return action
        problem = await asyncio.to_thread(
            suppress.fill_problem, text, holes.filled_text(text, markers, outcome.texts),
            document.language_id, settings.completion.check_parse)
        if problem is not None:
            self.stats.count(f"suppressed:{problem}")
            log.info("hole fills for %s not offered (%s): %r", data.uri, problem, outcome.texts)
            return action
        encoding = encoding_name(self.workspace.position_encoding)
        edits = holes.text_edits(text, markers, outcome.texts, encoding)
        log.info("filled %d of %d holes in %s (%d passes, %.0f ms)", len(edits), len(markers),
                 data.uri, outcome.steps, outcome.model_ms)
        action.edit = types.WorkspaceEdit(
            changes={data.uri: edits},
            document_changes=[types.TextDocumentEdit(
                text_document=types.OptionalVersionedTextDocumentIdentifier(
                    uri=data.uri, version=data.version), edits=list(edits))])
        return action

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

    def _neighbours(self, uri: str, document) -> list[tuple[str, Any]]:
        documents = self.workspace.text_documents
        found = []
        for other in self.recent:
            if other == uri or other not in documents:
                continue
            candidate = documents[other]
            if candidate.language_id == document.language_id:
                found.append((other.rsplit("/", 1)[-1], candidate))
        return found

    def _finish(self, began: float, outcome, uri: str, text: str, cache_hit: bool = False,
                snippets: int = 0) -> None:
        latency = (time.perf_counter() - began) * 1e3
        self.last_latency_ms = round(latency, 1)
        model_ms = outcome.model_ms if outcome is not None else None
        steps = outcome.steps if outcome is not None else None
        self.stats.record(latency, model_ms, steps)
        self.stats.count("completed" if text else "empty")
        log.debug("completion %s: %.1f ms (model %s ms, %s passes, %s tokens, cache hit %s, "
                  "%d snippets): %r", uri.rsplit("/", 1)[-1], latency,
                  f"{model_ms:.1f}" if model_ms is not None else "-", steps,
                  outcome.tokens if outcome is not None else "-", cache_hit, snippets, text)
        self.send_status()

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


def wants_rewrite(only: list[str] | None) -> bool:
    """Whether a codeAction request's `only` admits refactor.rewrite actions (LSP: a kind
    admits its sub-kinds)."""
    kind = types.CodeActionKind.RefactorRewrite.value
    return not only or any(kind == want or kind.startswith(f"{want}.") for want in only)


@functools.lru_cache(maxsize=8)
def compiled_patterns(patterns: tuple[str, ...]):
    return holes.compile_patterns(patterns)


HANDLERS: list[tuple[str, Any, Callable]] = []  # (method, options, handler) of every server


def handles(method: str, options: Any = None) -> Callable[[Callable], Callable]:
    """Register a handler for every server `make_server` makes."""
    def register(handler: Callable) -> Callable:
        HANDLERS.append((method, options, handler))
        return handler
    return register


SERVING: list[DiffusionServer] = []  # the server of the client served now (one at a time)
UNREPORTED: list[str] = []  # process-wide problems found while no server was serving


def report_to_user(message: str) -> None:
    """Tell the user of the client served now (from any thread), e.g. that the log file was
    lost; held for the next server when none is serving yet."""
    if SERVING:
        SERVING[0].report_from_any_thread(message)
    else:
        UNREPORTED.append(message)


@handles(types.INITIALIZE)
def on_initialize(ls: DiffusionServer, params: types.InitializeParams) -> None:
    ls.event_loop = asyncio.get_running_loop()
    for message in ls.pending_reports:
        ls.report_from_any_thread(message)
    ls.pending_reports.clear()
    ls.apply_settings(params.initialization_options)


@handles(types.INITIALIZED)
def on_initialized(ls: DiffusionServer, params: types.InitializedParams) -> None:
    ls.start_backend()


@handles(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def on_configuration(ls: DiffusionServer, params: types.DidChangeConfigurationParams) -> None:
    if ls.apply_settings(params.settings):
        log.info("model settings changed: restarting the backend")
        ls.start_backend()


@handles(types.TEXT_DOCUMENT_DID_OPEN)
def on_open(ls: DiffusionServer, params: types.DidOpenTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.touch(uri)
    ls.memory.opened(uri, ls.document_path(uri),
                     ctx.normalize_line_ends(params.text_document.text))


@handles(types.TEXT_DOCUMENT_DID_CHANGE)
def on_change(ls: DiffusionServer, params: types.DidChangeTextDocumentParams) -> None:
    uri = params.text_document.uri
    document = ls.open_document(uri)
    if document is not None:
        text = ctx.normalize_line_ends(document.source)
        ls.memory.changed(uri, text, ls.document_path(uri))
        ls.feedback.document_changed(uri, text)


@handles(types.TEXT_DOCUMENT_DID_CLOSE)
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


@handles(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def on_inline_completion(ls: DiffusionServer, params: types.InlineCompletionParams
                               ) -> types.InlineCompletionList | None:
    answer = await ls.answer(params.text_document.uri, params.position)
    if answer is None:
        return types.InlineCompletionList(items=[])
    position = params.position
    item_id = uuid.uuid4().hex
    ls.feedback.offer(item_id, "completion", params.text_document.uri)
    item = types.InlineCompletionItem(
        insert_text=answer.text, range=types.Range(start=position, end=position),
        command=types.Command(title="Accept completion", command=ACCEPT_COMPLETION,
                              arguments=[item_id]))
    return types.InlineCompletionList(items=[item])


@handles(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(
    trigger_characters=[".", "(", " ", "\n"]))
async def on_completion(ls: DiffusionServer, params: types.CompletionParams
                        ) -> types.CompletionList:
    answer = await ls.answer(params.text_document.uri, params.position)
    if answer is None:
        return types.CompletionList(is_incomplete=True, items=[])
    position = params.position
    first_line = answer.text.strip().split("\n", 1)[0]
    item = types.CompletionItem(
        label=first_line[:80] or answer.text[:80],
        kind=types.CompletionItemKind.Text,
        detail="diffusion-lsp",
        documentation=types.MarkupContent(kind=types.MarkupKind.Markdown,
                                          value=f"```\n{answer.text}\n```"),
        text_edit=types.TextEdit(range=types.Range(start=position, end=position),
                                 new_text=answer.text),
        filter_text=answer.cursor.line_before.lstrip() + answer.text,
        sort_text="0",
        preselect=True,
    )
    return types.CompletionList(is_incomplete=True, items=[item])


@handles(types.TEXT_DOCUMENT_CODE_ACTION, types.CodeActionOptions(
    code_action_kinds=[types.CodeActionKind.RefactorRewrite], resolve_provider=True))
def on_code_action(ls: DiffusionServer, params: types.CodeActionParams
                   ) -> list[types.CodeAction]:
    return ls.hole_actions(params.text_document.uri, params.range, params.context.only)


@handles(types.CODE_ACTION_RESOLVE)
async def on_code_action_resolve(ls: DiffusionServer, params: types.CodeAction
                                 ) -> types.CodeAction:
    return await ls.resolve_holes(params)


@handles(STATS)
def on_stats(ls: DiffusionServer, params: Any = None) -> dict:
    return ls.stats_snapshot()


@handles(DOCTOR)
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


@handles(DOCUMENT)
def on_document(ls: DiffusionServer, params: Any = None) -> dict | None:
    """The server's copy of a document (debugging and the fuzz suite): `{"uri"}` in,
    `{"uri", "version", "text"}` out, or null when it is not open."""
    uri = getattr(params, "uri", None)
    document = ls.open_document(uri) if isinstance(uri, str) else None
    if document is None:
        return None
    return {"uri": uri, "version": document.version, "text": document.source}


@handles(types.SHUTDOWN)
def on_shutdown(ls: DiffusionServer, params: Any = None) -> None:
    for task in list(ls.inflight.values()):
        task.cancel()
    engine = getattr(ls.backend, "engine", None)
    if engine is not None:
        engine.close(timeout=2.0)
