"""Bytes to JSON-RPC messages and back, for stdio and TCP, robust to a broken or hostile client.

pygls' reader trusts `Content-Length`: a wrong one desynchronises the stream, 10^12 raises
MemoryError and 10^9 waits forever. `FrameReader` is a pure incremental parser instead: a
message is at most `MAX_MESSAGE_BYTES`, bytes outside a frame are skipped up to the next
`Content-Length` header, a body that is not JSON is answered with a parse error, a length that
was too long gives back what follows the message, and a frame that stalls half-read is closed
after `STALL_S`. `pump` runs a reader over any byte source; `serve_stdio` and `serve_tcp` are the
two transports (TCP: one client at a time, each with fresh server state).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("diffusion_lsp")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a larger body is refused and skipped
MAX_HEADER_BYTES = 8192  # a header line longer than this is garbage
STALL_S = 5.0  # a frame whose body stops arriving for this long is taken as it is
CHUNK_BYTES = 1 << 16
QUEUED_CHUNKS = 64  # stdin chunks read ahead of the event loop (back-pressure beyond)
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
HEADER_NAME = b"content-length:"
CONTENT_LENGTH = re.compile(re.escape(HEADER_NAME), re.IGNORECASE)
HEADER_LINE = re.compile(rb"([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*?)[ \t]*")
DIGITS = re.compile(r"[0-9]+")
MAX_DIGITS = 18  # a Content-Length with more digits is over any limit (and not parsed)
HEADER_TAIL = len(HEADER_NAME) - 1  # bytes kept while skipping, for a split header
WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class Message:
    """A decoded JSON value (not yet checked to be a JSON-RPC message)."""

    value: Any


@dataclass(frozen=True)
class Problem:
    """Bytes that are not a message. `reply`: answer with an error (id `msg_id`, else null)."""

    code: int
    reason: str
    reply: bool = True
    msg_id: Any = None


Event = Message | Problem


def readable_id(value: Any) -> int | str | None:
    """The id of a JSON-RPC message, when it has one a response can carry (LSP: integer or
    string); None otherwise."""
    if not isinstance(value, dict):
        return None
    msg_id = value.get("id")
    if isinstance(msg_id, str) or (isinstance(msg_id, int) and not isinstance(msg_id, bool)):
        return msg_id
    return None


def starts_a_header(data: bytes) -> bool:
    """Whether `data` begins with `Content-Length:`, or with the start of it."""
    head = bytes(data[:len(HEADER_NAME)]).lower()
    return bool(head) and HEADER_NAME.startswith(head)


def decode_body(body: bytes) -> tuple[Event, bytes]:
    """A frame's body as a message or a problem, plus the bytes to read again: after a JSON
    value, what starts with another header (the frame claimed too many bytes)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        try:  # the id may still be readable, to answer the right request
            msg_id = readable_id(json.loads(body.decode("utf-8", "replace")))
        except ValueError:
            msg_id = None
        return Problem(PARSE_ERROR, f"the body is not valid UTF-8 ({error.reason} at byte "
                                    f"{error.start})", msg_id=msg_id), b""
    try:
        return Message(json.loads(text)), b""
    except ValueError as error:
        failure = error
    stripped = text.lstrip()
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except ValueError:
        value, end = None, -1
    rest = stripped[end:].lstrip().encode() if end >= 0 else b""
    if end >= 0 and starts_a_header(rest):
        log.warning("a Content-Length was %d bytes too long; read the message and resynchronised",
                    len(rest))
        return Message(value), rest
    header = CONTENT_LENGTH.search(body, 1)
    return (Problem(PARSE_ERROR, f"malformed JSON: {failure}"),
            body[header.start():] if header else b"")


class FrameReader:
    """Incremental parser of LSP's base protocol (`Content-Length: N\\r\\n\\r\\n` + N bytes).

    Pure: `feed` bytes, get events; never holds more than one message (and a header) in
    memory, whatever a client claims or sends."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.buffer = bytearray()
        self.length: int | None = None  # of the body being read; None while reading headers
        self.headers: dict[str, str] = {}
        self.skipping = False  # between frames after garbage, looking for the next header

    @property
    def mid_body(self) -> bool:
        return self.length is not None and len(self.buffer) > 0

    def feed(self, data: bytes) -> list[Event]:
        self.buffer += data
        events: list[Event] = []
        while True:
            event = self._body() if self.length is not None else self._header()
            if event is None:
                return events
            if event is not _PROGRESS:
                events.append(event)

    def expire(self) -> list[Event]:
        """The body stopped arriving: take what came as the whole message."""
        if self.length is None:
            return []
        body, self.buffer = bytes(self.buffer), bytearray()
        claimed, self.length = self.length, None
        event, rest = decode_body(body)
        if isinstance(event, Problem):
            event = Problem(event.code, f"incomplete message: {len(body)} of {claimed} bytes "
                                        f"came in {STALL_S:g} s ({event.reason})",
                            msg_id=event.msg_id)
        return [event, *self.feed(rest)]

    # -- states --------------------------------------------------------------------------------

    def _body(self) -> Event | object | None:
        assert self.length is not None
        if len(self.buffer) < self.length:
            return None
        body = bytes(self.buffer[:self.length])
        del self.buffer[:self.length]
        self.length = None
        event, rest = decode_body(body)
        self.buffer[:0] = rest
        return event

    def _header(self) -> Event | object | None:
        if self.skipping:
            return self._skip()
        if not self.headers:  # blank lines and spaces between frames are harmless
            kept = self.buffer.lstrip(WHITESPACE)
            del self.buffer[:len(self.buffer) - len(kept)]
        newline = self.buffer.find(b"\n")
        if newline < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                return self._garbage("a header line too long")
            return None
        line = bytes(self.buffer[:newline]).rstrip(b"\r")
        del self.buffer[:newline + 1]
        if line:
            match = HEADER_LINE.fullmatch(line)
            if match is None:
                self.buffer[:0] = line + b"\n"
                return self._garbage("bytes outside any frame")
            self.headers[match[1].decode().lower()] = match[2].decode("latin-1")
            return _PROGRESS
        headers, self.headers = self.headers, {}
        raw = headers.get("content-length")
        if raw is None:
            return self._refuse("a message without a Content-Length header")
        if not DIGITS.fullmatch(raw):
            return self._refuse(f"a message with Content-Length {raw[:40]!r}")
        length = int(raw) if len(raw) <= MAX_DIGITS else None
        if length is None or length > self.max_bytes:
            size = f"{length:,}" if length is not None else f"a {len(raw)}-digit number of"
            return self._refuse(f"a message of {size} bytes (the limit is "
                                f"{self.max_bytes:,}); skipped to the next header")
        self.length = length
        return _PROGRESS

    def _refuse(self, reason: str) -> Problem:
        log.warning("refused %s", reason)
        self.skipping = True
        return Problem(INVALID_REQUEST, f"refused {reason}")

    def _garbage(self, what: str) -> Problem:
        log.warning("skipping %s up to the next Content-Length header", what)
        self.headers = {}
        self.skipping = True
        return Problem(PARSE_ERROR, what, reply=False)

    def _skip(self) -> object | None:
        """Drop bytes up to the next `Content-Length:` (keeping a tail that may start one)."""
        match = CONTENT_LENGTH.search(self.buffer)
        if match is None:
            del self.buffer[:max(0, len(self.buffer) - HEADER_TAIL)]
            return None
        del self.buffer[:match.start()]
        self.skipping = False
        return _PROGRESS


_PROGRESS = object()  # a state change without an event


# ---------------------------------------------------------------------------------------------
# Running a reader over a transport


class Receiver(Protocol):
    """What `pump` hands events to (the server's protocol)."""

    stopped: bool

    def receive(self, value: Any) -> None: ...

    def reply_problem(self, problem: Problem) -> None: ...


async def pump(read: Callable[[], Awaitable[bytes]], receiver: Receiver,
               max_bytes: int = MAX_MESSAGE_BYTES, stall_s: float = STALL_S) -> None:
    """Read chunks until end of input or until the receiver stops; hand each event on."""
    reader = FrameReader(max_bytes)
    pending = asyncio.ensure_future(read())
    try:
        while not receiver.stopped:
            done, _ = await asyncio.wait({pending}, timeout=stall_s if reader.mid_body else None)
            if not done:
                events = reader.expire()
            else:
                chunk = pending.result()
                if not chunk:
                    return
                events = reader.feed(chunk)
                pending = asyncio.ensure_future(read())
            for event in events:
                deliver(receiver, event)
                if receiver.stopped:
                    return
    finally:
        pending.cancel()


def deliver(receiver: Receiver, event: Event) -> None:
    """Hand one event on; a bug in handling one message is logged, never the end of serving."""
    try:
        if isinstance(event, Message):
            receiver.receive(event.value)
        else:
            receiver.reply_problem(event)
    except (BrokenPipeError, ConnectionError):
        raise
    except Exception:  # noqa: BLE001 - the next message must still be read
        log.exception("failed to handle a message")


def stdin_chunks(fd: int) -> Callable[[], Awaitable[bytes]]:
    """Chunks of file descriptor `fd`, read by a daemon thread (a blocking read never holds up
    the event loop or the process's exit), bounded by QUEUED_CHUNKS."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUED_CHUNKS)

    def read_forever() -> None:
        while True:
            try:
                chunk = os.read(fd, CHUNK_BYTES)
            except OSError:
                chunk = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            except RuntimeError:  # the loop is gone
                return
            if not chunk:
                return

    threading.Thread(target=read_forever, name="stdin", daemon=True).start()
    return queue.get


class Connection(Protocol):
    """A server state serving one client (see `DiffusionServer.connect`)."""

    protocol: Receiver

    async def run(self, read: Callable[[], Awaitable[bytes]], writer: Any) -> None: ...


BUSY = ("diffusion-lsp: another client is connected to this server (it serves one at a time "
        "over TCP); start another `diffusion-lsp serve --tcp --port N` for this one")


async def serve_tcp(host: str, port: int, connect: Callable[[], Connection],
                    ready: Callable[[list[tuple]], None] | None = None) -> None:
    """Listen on host:port until cancelled. One client at a time, each with a fresh
    `connect()` state; a second client gets a `window/showMessage` saying so and is closed;
    after a client leaves the next one is served."""
    busy = asyncio.Lock()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if busy.locked():
            log.warning("refused a second client %s: one client at a time", peer)
            body = json.dumps({"jsonrpc": "2.0", "method": "window/showMessage",
                               "params": {"type": 1, "message": BUSY}}).encode()
            writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await _close(writer)
            return
        async with busy:
            log.info("client %s connected", peer)
            try:
                await connect().run(lambda: reader.read(CHUNK_BYTES), writer)
            except (ConnectionError, OSError) as error:
                log.info("client %s: connection lost (%s)", peer, error)
            finally:
                await _close(writer)
            log.info("client %s left; listening for the next one", peer)

    listener = await asyncio.start_server(on_client, host, port)
    addresses = [sock.getsockname() for sock in listener.sockets]
    log.info("listening on %s", ", ".join(f"{a[0]}:{a[1]}" for a in addresses))
    if ready is not None:
        ready(addresses)
    async with listener:
        await listener.serve_forever()


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass
