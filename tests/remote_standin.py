"""A STAND-IN for Inception's Mercury FIM API.

The stand-in is a small HTTP/1.1 server on loopback that follows the request and response shapes
Inception documents for `POST /v1/fim/completions` (and OpenAI's `/v1/completions` with
`suffix`): a bearer key, `model`/`prompt`/`suffix`/`max_tokens`/`stop`/`temperature` in, an
OpenAI text completion out. It is not Mercury: no real key is ever used or stored here.

Used by tests/test_remote.py, test_server_remote.py and test_faults.py.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import msgspec

from diffusion_contract import wire

KEY = "sk_standin_0123456789abcdef"  # a made-up key: it must never reach a log line
KEY_ENV = "DIFFUSION_LSP_TEST_KEY"
# what Inception documents for a FIM request; anything else in a body is a contract break
FIM_FIELDS = {"model", "prompt", "suffix", "max_tokens", "stop", "temperature", "top_p",
              "presence_penalty", "frequency_penalty", "stream"}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None


@dataclass
class StandIn:
    """A Mercury-shaped FIM server. `plan` scripts the next answers to completion requests:
    "ok", an HTTP status (429, 500...), "hang" (never answer) or "chat" (a chat-shaped answer)."""

    key: str = KEY
    ours: bool = False  # answer /health as our service does (then it takes our extensions)
    plan: list = field(default_factory=list)
    text: str = "a + b"
    seen: list[Seen] = field(default_factory=list)
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)  # a hung client hung up
    server: asyncio.AbstractServer | None = None
    port: int = 0

    async def __aenter__(self) -> StandIn:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def completions(self) -> list[Seen]:
        return [s for s in self.seen if s.path in (wire.FIM_PATH, wire.COMPLETIONS_PATH)]

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                status, body, headers = self._answer(request)
                if status == "hang":
                    self.hung.set()
                    if await reader.read(1) == b"":  # waits until the client closes
                        self.dropped.set()
                    return
                _write_response(writer, status, body, headers)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    def _answer(self, seen: Seen) -> tuple:
        self.seen.append(seen)
        if seen.headers.get("authorization") != f"Bearer {self.key}":
            return 401, {"error": {"message": "Incorrect API key provided",
                                   "type": "invalid_request_error",
                                   "code": "invalid_api_key"}}, {}
        if seen.path == wire.HEALTH_PATH and self.ours:
            return 200, msgspec.to_builtins(wire.Health("ok", replicas=1)), {}
        if seen.path == wire.MODELS_PATH and seen.method == "GET":
            return 200, {"object": "list", "data": [{"id": "mercury-coder", "object": "model"}]}, {}
        if seen.path not in (wire.FIM_PATH, wire.COMPLETIONS_PATH) or seen.method != "POST":
            return 404, {"error": {"message": "not found"}}, {}
        problem = _contract_problem(seen, self.ours)
        if problem:
            return 400, {"error": {"message": problem, "type": "invalid_request_error"}}, {}
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "hang":
            return "hang", None, {}
        if isinstance(step, int):
            headers = {"Retry-After": "0"} if step == 429 else {}
            return step, {"error": {"message": f"stand-in says {step}"}}, headers
        body = seen.body or {}
        if step == "chat":
            return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": self.text}}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                   "total_tokens": 8}}, {}
        return 200, {"id": "cmpl-standin", "object": "text_completion", "created": 1,
                     "model": body["model"],
                     "choices": [{"index": 0, "text": self.text, "finish_reason": "length"}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                               "total_tokens": 8}}, {}


def _contract_problem(seen: Seen, ours: bool = False) -> str | None:
    body = seen.body
    allowed = FIM_FIELDS | (set(wire.FimRequest.__struct_fields__) if ours else set())
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if seen.headers.get("content-type", "").split(";")[0] != "application/json":
        return "Content-Type must be application/json"
    if seen.path == wire.FIM_PATH and set(body) - allowed:
        return f"unknown fields: {sorted(set(body) - allowed)}"
    if not isinstance(body.get("model"), str) or not isinstance(body.get("prompt"), str):
        return "model and prompt are required strings"
    if not isinstance(body.get("suffix", ""), str):
        return "suffix must be a string"
    if not isinstance(body.get("max_tokens", 1), int) or body.get("max_tokens", 1) < 1:
        return "max_tokens must be a positive integer"
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        return "stop must be a string or a list of strings"
    if body.get("stream"):
        return "this stand-in does not stream"
    return None


async def _read_request(reader: asyncio.StreamReader) -> Seen | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode().split(" ", 2)
    headers = {}
    while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    raw = await reader.readexactly(int(headers.get("content-length", "0")))
    try:
        body = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        body = None
    return Seen(method, path.split("?")[0], headers, body)


def _write_response(writer: asyncio.StreamWriter, status: int, body: dict,
                    headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
             f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
