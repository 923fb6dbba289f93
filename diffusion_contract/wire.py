"""The remote protocol: a FIM completions API, typed with msgspec.

Two endpoints, one response shape:

- `POST /v1/fim/completions`, the shape Inception documents for Mercury Coder (and Mistral for
  Codestral): `prompt` is the text before the hole, `suffix` the text after it.
- `POST /v1/completions`, OpenAI's legacy completions with `suffix`, which other servers accept.

Both answer an OpenAI text completion: `{id, object: "text_completion", created, model,
choices: [{index, text, finish_reason}], usage: {prompt_tokens, completion_tokens,
total_tokens}}`. Errors are `{"error": {"message", "type", "code"}}`.

Our service adds optional request fields (how the diffusion sampler commits tokens:
`threshold`, `tokens_per_step`, and the reference samplers' settings `algorithm`, `steps`,
`block_length`, `top_p`, `top_k`, `alg_temp`, `cfg_scale`, `exact`, `seed`; see `EXTENSIONS`)
and one optional response field (`diffusion`: steps and timings). The client sends the request
fields only to a server whose `GET /health` says it is ours; other servers never see them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from diffusion_contract.options import (
    COMMIT_SETTINGS,
    SAMPLER_SETTINGS,
    settings_problem,
    settings_struct,
)

FIM_PATH = "/v1/fim/completions"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
SERVICE_NAME = "diffusion-lsp"  # what our /health calls itself
MAX_STOP_WORDS = 16  # as OpenAI's API allows
MAX_TOKENS_LIMIT = 4096  # a completion longer than this is a mistake, not a request

# finish reasons: the engine's words and the API's ("stop" or "length", as OpenAI's)
API_FINISH = {"end": "stop", "newline": "stop", "stop": "stop", "max_tokens": "length",
              "cancelled": "stop"}


class WireError(ValueError):
    """A request the API rejects (400), with the message the client gets."""


# -- requests ------------------------------------------------------------------------------------


# Our extensions to both request kinds, sent only to our service: how many positions a step
# commits and the reference samplers' settings, as diffusion_contract/options.py declares them
# (temperature is the API's own field). Left out or null: the sampler's default (seed: a fresh one
# per request when temperature > 0).
EXTENSIONS = tuple(setting for setting in (*COMMIT_SETTINGS, *SAMPLER_SETTINGS)
                   if setting.name != "temperature")
SamplerExtensions = settings_struct("SamplerExtensions", EXTENSIONS, unset=True, kw_only=True,
                                    module=__name__)


class FimRequest(SamplerExtensions):
    """`POST /v1/fim/completions`: fill between `prompt` and `suffix`. UNSET fields are left
    out of the JSON."""

    model: str
    prompt: str
    suffix: str = ""
    max_tokens: int = 64
    stop: str | list[str] | None | UnsetType = UNSET
    temperature: float = 0.0
    # true: server-sent events, one per denoising step with the hole as it stands, then the
    # answer (our service; see `StreamChunk`)
    stream: bool | UnsetType = UNSET
    diffusing: bool | UnsetType = UNSET  # Mercury's name for full-state streaming: accepted


class CompletionsRequest(SamplerExtensions):
    """`POST /v1/completions` with `suffix` (OpenAI's legacy completions)."""

    model: str
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int = 16  # OpenAI's default
    stop: str | list[str] | None | UnsetType = UNSET
    temperature: float = 0.0
    n: int | UnsetType = UNSET
    stream: bool | UnsetType = UNSET
    echo: bool | UnsetType = UNSET


class Hole(msgspec.Struct, frozen=True):
    """A validated request, whichever endpoint it came from."""

    model: str
    prefix: str
    suffix: str
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    # the extensions the request gave (EXTENSIONS, by name); the rest are the sampler's defaults
    sampler: dict[str, Any] = {}
    stream: bool = False  # server-sent events of the intermediate states (FIM only)
    min_tokens: int | None = None  # None: the service's (a next edit's hole may stay empty)

    @property
    def single_line(self) -> bool:
        """A newline stop word asks for one line: the sampler's single-line mode."""
        return "\n" in self.stop


def _given(value: Any, default: Any = None) -> Any:
    return default if value is UNSET else value


def stop_words(stop: str | list[str] | None | UnsetType) -> tuple[str, ...]:
    if stop is None or stop is UNSET:
        return ()
    words = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(words) > MAX_STOP_WORDS:
        raise WireError(f"stop: at most {MAX_STOP_WORDS} stop words")
    return tuple(word for word in words if word)


def _checked(hole: Hole, stream: bool, can_stream: bool = False) -> Hole:
    if stream and not can_stream:
        raise WireError(f"stream: streaming is supported on {FIM_PATH} only; send "
                        "stream=false here")
    if not 1 <= hole.max_tokens <= MAX_TOKENS_LIMIT:
        raise WireError(f"max_tokens must lie in [1, {MAX_TOKENS_LIMIT}]")
    if not 0.0 <= hole.temperature <= 2.0:
        raise WireError("temperature must lie in [0, 2]")
    problem = settings_problem(hole.max_tokens, temperature=hole.temperature, **hole.sampler)
    if problem is not None:
        raise WireError(problem)
    return hole


def sampler_of(request: FimRequest | CompletionsRequest) -> dict[str, Any]:
    """The extensions the request gives (neither left out nor null), by name."""
    given = {setting.name: getattr(request, setting.name) for setting in EXTENSIONS}
    return {name: value for name, value in given.items()
            if value is not UNSET and value is not None}


def decode_fim(body: bytes) -> Hole:
    """The hole in a `/v1/fim/completions` body; raises WireError."""
    try:
        request = msgspec.json.decode(body, type=FimRequest)
    except msgspec.DecodeError as error:
        raise WireError(f"bad request body: {error}") from error
    stream = bool(_given(request.stream, False))
    return _checked(Hole(request.model, request.prompt, request.suffix, request.max_tokens,
                         stop_words(request.stop), request.temperature, sampler_of(request),
                         stream),
                    stream, can_stream=True)


def decode_completions(body: bytes) -> Hole:
    """The hole in a `/v1/completions` body; raises WireError."""
    try:
        request = msgspec.json.decode(body, type=CompletionsRequest)
    except msgspec.DecodeError as error:
        raise WireError(f"bad request body: {error}") from error
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise WireError("prompt: send one prompt per request")
        prompt = prompt[0]
    if _given(request.n, 1) != 1:
        raise WireError("n: one completion per request")
    if _given(request.echo, False):
        raise WireError("echo is not supported")
    return _checked(Hole(request.model, prompt, request.suffix or "", request.max_tokens,
                         stop_words(request.stop), request.temperature, sampler_of(request)),
                    _given(request.stream, False))


# -- responses -----------------------------------------------------------------------------------


class Message(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    # chat-shaped FIM answers (Mistral's) carry the text here; never sent by our service
    message: Message | UnsetType = UNSET

    @property
    def content(self) -> str:
        if isinstance(self.message, Message) and self.message.content and not self.text:
            return self.message.content
        return self.text


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class DiffusionStats(msgspec.Struct):
    """Our extension: how the hole was filled."""

    steps: int  # forward passes
    full_passes: int  # of `steps`, those over the whole sequence
    finish_reason: str  # the engine's: end | newline | stop | max_tokens | cancelled
    model_ms: float  # time in the replica, queue included
    replica: str = ""


class CompletionResponse(msgspec.Struct):
    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = msgspec.field(default_factory=list)
    usage: Usage = msgspec.field(default_factory=Usage)
    diffusion: DiffusionStats | UnsetType = UNSET  # our service's extension


class StepInfo(msgspec.Struct, omit_defaults=True):
    """A stream event's place in the denoising: step `step` of about `steps`; the last event
    adds `DiffusionStats`' fields (its step is the number of forward passes)."""

    step: int
    steps: int
    full_passes: int | UnsetType = UNSET
    finish_reason: str | UnsetType = UNSET
    model_ms: float | UnsetType = UNSET
    replica: str | UnsetType = UNSET


class StreamChunk(msgspec.Struct):
    """One server-sent event of a streamed FIM completion (`stream: true`). In the spirit of
    Mercury's `diffusing` stream, each intermediate event carries the WHOLE hole as it stands
    (`choices[0].text`, every still-masked token drawn as U+2591), not a delta; its
    `finish_reason` is null and `diffusion` says the step. The last event carries the
    completion's text, a finish_reason, usage and the full `DiffusionStats`; then
    `data: [DONE]`. An error mid-stream is one event `{"error": {...}}`."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = msgspec.field(default_factory=list)
    usage: Usage | UnsetType = UNSET
    diffusion: StepInfo | UnsetType = UNSET


SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: bytes) -> bytes:
    """One server-sent event holding a JSON payload."""
    return b"data: " + payload + b"\n\n"


def step_chunk(request_id: str, model: str, step: int, steps: int, text: str) -> bytes:
    return sse(msgspec.json.encode(StreamChunk(
        id=request_id, model=model, created=int(time.time()),
        choices=[Choice(index=0, text=text, finish_reason=None)],
        diffusion=StepInfo(step, steps))))


def final_chunk(response: CompletionResponse) -> bytes:
    stats = response.diffusion
    info = StepInfo(stats.steps, stats.steps, stats.full_passes, stats.finish_reason,
                    stats.model_ms, stats.replica) if isinstance(stats, DiffusionStats) else UNSET
    return sse(msgspec.json.encode(StreamChunk(
        id=response.id, model=response.model, created=response.created,
        choices=response.choices, usage=response.usage, diffusion=info)))


def decode_chunk(data: str) -> StreamChunk | ErrorResponse | None:
    """The payload of one `data:` line: a chunk, an error, or None for `[DONE]`. Raises
    msgspec errors for anything else."""
    if data.strip() == "[DONE]":
        return None
    raw = data.encode()
    if raw.lstrip().startswith(b'{"error"'):
        return msgspec.json.decode(raw, type=ErrorResponse)
    chunk = msgspec.json.decode(raw, type=StreamChunk)
    if not chunk.choices:
        raise msgspec.ValidationError("a stream event has no choices")
    return chunk


class ErrorBody(msgspec.Struct):
    message: str
    type: str = "invalid_request_error"
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


def completion_response(model: str, text: str, prompt_tokens: int, completion_tokens: int,
                        stats: DiffusionStats | None = None) -> CompletionResponse:
    finish = API_FINISH.get(stats.finish_reason, "stop") if stats else "stop"
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex[:24]}", model=model, created=int(time.time()),
        choices=[Choice(index=0, text=text, finish_reason=finish)],
        usage=Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
        diffusion=stats if stats is not None else UNSET)


def error_body(message: str, kind: str = "invalid_request_error",
               code: str | None = None) -> bytes:
    return msgspec.json.encode(ErrorResponse(ErrorBody(message, kind, code)))


def error_message(body: bytes) -> str:
    """The message in an error answer; the start of the body when it is not ours."""
    try:
        return msgspec.json.decode(body, type=ErrorResponse).error.message
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    try:
        detail = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(detail, dict):
        for key in ("message", "detail", "error"):
            value = detail.get(key)
            if isinstance(value, str):
                return value
    return str(detail)[:200]


def decode_response(body: bytes) -> CompletionResponse:
    """An answer from any server speaking the API; raises msgspec errors."""
    response = msgspec.json.decode(body, type=CompletionResponse)
    if not response.choices:
        raise msgspec.ValidationError("the answer has no choices")
    return response


class Health(msgspec.Struct):
    """`GET /health` of our service."""

    status: Literal["ok", "starting"]
    service: str = SERVICE_NAME
    model: str = ""
    replicas: int = 0
