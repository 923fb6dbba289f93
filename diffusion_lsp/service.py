"""`diffusion-lsp service`: the diffusion engine behind the FIM completions API, on Ray Serve.

Two deployments, one application:

    HTTP ─▶ Ray Serve proxy ─▶ Gateway (1 replica, no CPU reserved)
                                 auth, routing, JSON (diffusion_contract/wire.py), metrics
                                   │ DeploymentHandle: the least-loaded of two random replicas
                                   ▼
                               Infiller (N replicas: one per GPU, or CPU replicas)
                                 one model + one Engine each

Batching. The engine batches at the level of denoising steps: a request joins the batch at the
next step and leaves it as soon as its hole is filled (continuous batching; several holes'
hole-only steps packed into one pass, model/decoding/packed_step.py). So, by default
(`batching="engine"`), each replica accepts up to `max_batch` requests at once
(`max_ongoing_requests`) and hands each straight to its engine, whose batch is bounded by
`max_batch` and by memory (what does not fit waits in the engine, at most `max_batch`);
requests beyond that wait in Ray Serve's router, which sends each to whichever replica frees
up first, at most `max_queued` of them (`max_queued_requests`); past that the gateway answers
429 with Retry-After at once (`/metrics`: `queue_full`), as it does should an engine's own
queue be full (`model.engine.QueueFull`). With
`batching="serve"`, Ray Serve's `@serve.batch` first collects up to `max_batch` requests (waiting
`batch_wait_s` at most) and submits them to the engine together: they start in the same step,
and the batch answers when its slowest hole is done. The load test compares both.

Security: a bearer token, read from `DIFFUSION_LSP_TOKEN`, is required on every endpoint but
`/health` whenever it is set, and the command refuses to bind beyond loopback without one. Only
the token's SHA-256 travels into Ray (deployment arguments are visible to anyone who can read
the cluster's state); the token itself stays in this process.

Everything here but `run_service`, `build_app` and `app` imports without Ray, so the pieces can
be tested (and the language server installed) without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from diffusion_contract import edit_wire, wire
from diffusion_contract.options import QUANTIZATIONS
from diffusion_contract.percentile import percentile
from lsp_server.backends.remote import is_loopback
from model.decoding import next_edit
from model.network.families import parse_overrides

if TYPE_CHECKING:  # Ray, starlette and the model are imported where they are used
    from ray.serve import Application
    from starlette.responses import Response

    from diffusion_contract.options import InfillOptions

log = logging.getLogger(__name__)

TOKEN_ENV = "DIFFUSION_LSP_TOKEN"
APP_NAME = "diffusion-lsp"
DEFAULT_MAX_BATCH = 16
SERVE_BATCH_WAIT_S = 0.005  # batching="serve": how long a batch waits to fill up, at most
REQUEST_TIMEOUT_S = 60.0  # the proxy answers 408 past this; clients give up much sooner
MAX_BODY_BYTES = 4 * 1024 * 1024  # a larger body is refused (413) before it is read
# the whole body must arrive within this (a client that trickles it in, slowloris-style, gets
# 408 and its connection back); an editor's request arrives in milliseconds
BODY_READ_TIMEOUT_S = 10.0
LATENCY_WINDOW = 2048  # /metrics percentiles are over this many recent completions
QUANTILES = (0.5, 0.95, 0.99)
HEALTH_TIMEOUT_S = 2.0
# stopping a replica: requests in flight get this long to finish (a completion that takes
# longer is of no use to an editor anyway), checked this often
GRACEFUL_SHUTDOWN_TIMEOUT_S = 5.0
GRACEFUL_SHUTDOWN_WAIT_S = 0.5
SERVE_SHUTDOWN_S = 10.0  # waiting for Serve to drain and stop, at most; then Ray is stopped
OBJECT_STORE_BYTES = 128 * 1024 * 1024  # the local Ray instance: holes are small
PROGRESS, FILLED = b"P", b"F"  # what a replica's stream part holds: a step, or the answer
BUSY = b"B"  # a replica's answer when its engine's queue is full: BUSY + Retry-After seconds
DEFAULT_MAX_QUEUED = 256  # requests waiting for a replica, at most; then 429 + Retry-After
COMPLETION_PATHS = {wire.FIM_PATH: wire.decode_fim, wire.COMPLETIONS_PATH: wire.decode_completions}


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceConfig:
    """What the deployments are built from (picklable; no secrets)."""

    model: str | None = None  # a model directory; None = the bundled model
    family: str | None = None
    family_overrides: tuple[tuple[str, str], ...] = ()  # (field, value): model.network.families
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"
    quantization: str = "auto"  # none | int8 | int4 | auto (model.network.quantize)
    replicas: int | None = None  # fixed count; None = one per GPU, else 1
    min_replicas: int | None = None  # with max_replicas: autoscale between them
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    max_batch: int = DEFAULT_MAX_BATCH
    max_queued: int = DEFAULT_MAX_QUEUED  # waiting for a replica; then 429 + Retry-After
    batching: str = "engine"  # engine | serve
    model_name: str = wire.SERVICE_NAME  # what the API calls the model
    token_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; known: "
                             f"{', '.join(QUANTIZATIONS)}")
        if self.batching not in ("engine", "serve"):
            raise ValueError(f"unknown batching {self.batching!r}; known: engine, serve")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas, or neither")
        if self.min_replicas is not None and self.max_replicas is not None and not (
                0 < self.min_replicas <= self.max_replicas):
            raise ValueError("need 0 < min replicas <= max replicas")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.max_batch < 1:
            raise ValueError("max batch must be at least 1")
        if self.max_queued < 0:
            raise ValueError("max queued must be at least 0")


def infiller_options(config: ServiceConfig, gpus_in_cluster: float) -> dict[str, Any]:
    """Ray Serve options of the model deployment: replicas, resources, concurrency."""
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus_in_cluster >= 1)
    actor = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": config.cpus_per_replica}
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": config.max_batch,
        "max_queued_requests": config.max_queued,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_TIMEOUT_S,
        "graceful_shutdown_wait_loop_s": GRACEFUL_SHUTDOWN_WAIT_S,
    }
    if config.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "target_ongoing_requests": max(1, config.max_batch // 2)}
    else:
        default = max(1, int(gpus_in_cluster)) if use_gpu else 1
        options["num_replicas"] = config.replicas or default
    return options


def replica_device(config: ServiceConfig, options: dict[str, Any]) -> str:
    return "cuda" if options["ray_actor_options"].get("num_gpus") else "cpu"


# -- security ------------------------------------------------------------------------------------


def token_digest(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def authorized(header: str | None, digest: str | None) -> bool:
    """Whether an `Authorization` header carries the token whose SHA-256 is `digest`."""
    if digest is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    presented = hashlib.sha256(header[len("Bearer "):].strip().encode()).hexdigest()
    return hmac.compare_digest(presented, digest)


def binding_problem(host: str, token: str | None) -> str | None:
    """Why the service must not listen on `host`; None when it may."""
    if token or is_loopback(host):
        return None
    return (f"refusing to listen on {host} without a token: set {TOKEN_ENV} "
            "(every client then sends it as a bearer token), or listen on 127.0.0.1")


# -- metrics -------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `values` (`diffusion_contract.percentile`); 0 for none."""
    return percentile(values, q * 100) if values else 0.0


@dataclass
class Metrics:
    """Counters and a window of recent latencies, as Prometheus text or JSON."""

    started: float = field(default_factory=time.time)
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    model_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    latency_sum_ms: float = 0.0
    completions: int = 0
    completion_tokens: int = 0
    steps: int = 0
    inflight: int = 0
    queue_full: int = 0  # requests answered 429: their replica's queue was full
    by_replica: Counter[str] = field(default_factory=Counter)

    def record(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """One completion or edit in progress for the `inflight` gauge, however it ends."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def record_completion(self, latency_ms: float, stats: wire.DiffusionStats,
                          tokens: int) -> None:
        self.completions += 1
        self.latencies_ms.append(latency_ms)
        self.model_ms.append(stats.model_ms)
        self.latency_sum_ms += latency_ms
        self.completion_tokens += tokens
        self.steps += stats.steps
        self.by_replica[stats.replica] += 1

    def snapshot(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        model = sorted(self.model_ms)
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": [{"endpoint": e, "status": s, "count": n}
                         for (e, s), n in sorted(self.requests.items())],
            "inflight": self.inflight,
            "queue_full": self.queue_full,
            "completions": self.completions,
            "completion_tokens": self.completion_tokens,
            "denoising_steps": self.steps,
            "latency_ms": {f"p{round(q * 100)}": round(quantile(ordered, q), 2)
                           for q in QUANTILES} | {"window": len(ordered)},
            "model_ms": {f"p{round(q * 100)}": round(quantile(model, q), 2)
                         for q in QUANTILES},
            "by_replica": dict(self.by_replica),
        }

    def prometheus(self) -> str:
        ordered = sorted(self.latencies_ms)
        model = sorted(self.model_ms)
        prefix = "diffusion_lsp"
        lines = [f"# HELP {prefix}_requests_total HTTP requests answered, by endpoint and status.",
                 f"# TYPE {prefix}_requests_total counter"]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'{prefix}_requests_total{{endpoint="{endpoint}",status="{status}"}} '
                         f"{count}")
        for name, values, what in (("request_latency_ms", ordered, "at the gateway"),
                                   ("model_latency_ms", model, "in a replica, queue included")):
            lines += [f"# HELP {prefix}_{name} Completion latency {what}, over the last "
                      f"{LATENCY_WINDOW} completions.", f"# TYPE {prefix}_{name} summary"]
            lines += [f'{prefix}_{name}{{quantile="{q}"}} {quantile(values, q):.3f}'
                      for q in QUANTILES]
            if name == "request_latency_ms":
                lines += [f"{prefix}_{name}_sum {self.latency_sum_ms:.3f}",
                          f"{prefix}_{name}_count {self.completions}"]
        for name, value, kind, what in (
                ("inflight_requests", self.inflight, "gauge", "Completions in progress."),
                ("queue_full_total", self.queue_full, "counter",
                 "Requests answered 429: the replica's queue was full."),
                ("completion_tokens_total", self.completion_tokens, "counter",
                 "Tokens of completed holes."),
                ("denoising_steps_total", self.steps, "counter",
                 "Forward passes made for completed holes.")):
            lines += [f"# HELP {prefix}_{name} {what}", f"# TYPE {prefix}_{name} {kind}",
                      f"{prefix}_{name} {value}"]
        for replica, count in sorted(self.by_replica.items()):
            lines.append(f'{prefix}_replica_completions_total{{replica="{replica}"}} {count}')
        return "\n".join(lines) + "\n"


# -- the model replica ---------------------------------------------------------------------------


def infill_options(hole: wire.Hole, threshold: float | None = None) -> InfillOptions:
    """The sampler's options for a hole that came over the wire (the sampler's defaults for
    what the request leaves out; `threshold`: the model's, where the request gives none)."""
    from diffusion_contract.options import MIN_TOKENS, hole_options

    sampler = dict(hole.sampler)
    if sampler.get("threshold") is None and threshold is not None:
        sampler["threshold"] = threshold
    if "seed" not in sampler:
        sampler["seed"] = random.getrandbits(31) if hole.temperature > 0 else 0
    return hole_options(
        hole.max_tokens, single_line=hole.single_line, stop=hole.stop,
        temperature=hole.temperature,
        min_tokens=MIN_TOKENS if hole.min_tokens is None else hole.min_tokens, **sampler)


class Infiller:
    """One replica: a loaded model and its engine. Holes arrive as msgspec-encoded `wire.Hole`
    bytes and leave as `Filled` bytes (no pickling of our types across Ray)."""

    def __init__(self, config: ServiceConfig, device: str) -> None:
        import torch

        from model.engine import Engine
        from model.network.loader import load_model

        def load():
            if device == "cpu":
                torch.set_num_threads(max(1, int(config.cpus_per_replica)))
            return load_model(config.model, config.family, device, config.dtype,
                              overrides=dict(config.family_overrides),
                              quantization=config.quantization)

        # loaded, warmed up and run on the engine's own thread (Engine.start says why)
        # Ray passes at most max_batch at once: the engine's queue holds what memory holds back
        self.engine = Engine.start(load, max_batch=config.max_batch,
                                   max_queued=config.max_batch).result()
        loaded = self.engine.model
        self.tokenizer = loaded.tokenizer
        parameters = sum(p.numel() for p in loaded.network.parameters())
        self.description = (f"{loaded.path.name} ({loaded.family.name}, "
                            f"{parameters / 1e6:.1f}M parameters, {loaded.device.type})")
        self.replica = _replica_name()
        self._decoder = msgspec.json.Decoder(wire.Hole)
        self._batched = None
        if config.batching == "serve":
            from ray import serve

            self._batched = serve.batch(max_batch_size=config.max_batch,
                                        batch_wait_timeout_s=SERVE_BATCH_WAIT_S)(self._fill_many)

    async def info(self) -> str:
        return self.description

    def _options(self, hole: wire.Hole) -> InfillOptions:
        return infill_options(hole, self.engine.model.family.threshold)

    async def fill(self, body: bytes) -> bytes:
        """`Filled` bytes, or BUSY + seconds when the engine's queue is full."""
        from model.engine import QueueFull

        hole = self._decoder.decode(body)
        try:
            if self._batched is not None:
                filled = await self._batched(hole)
                if isinstance(filled, BaseException):
                    raise filled
                return filled
            return await self._fill_one(hole)
        except QueueFull as full:
            return BUSY + str(full.retry_after_s).encode()

    async def _fill_many(self, holes: list[wire.Hole]) -> list[bytes | BaseException]:
        """batching="serve": one batch from @serve.batch, submitted to the engine at once."""
        return list(await asyncio.gather(*(self._fill_one(hole) for hole in holes),
                                         return_exceptions=True))

    async def _fill_one(self, hole: wire.Hole) -> bytes:
        began = time.perf_counter()
        result = await self.engine.infill(hole.prefix, hole.suffix, self._options(hole))
        return self._filled(hole, result, began)

    async def fill_stream(self, body: bytes):
        """A hole's intermediate states, then its answer, as they come (Ray streams what this
        generator yields): `PROGRESS` + JSON `[step, steps, text]` after each step but the
        last, then `FILLED` + the `Filled` bytes. Closing the stream cancels the hole."""
        from model.decoding.preview import state_preview

        hole = self._decoder.decode(body)
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        model = self.engine.model

        def on_step(state) -> None:  # the engine's worker thread
            loop.call_soon_threadsafe(steps.put_nowait, state_preview(model, state))

        began = time.perf_counter()
        from model.engine import QueueFull

        try:
            request = self.engine.submit(hole.prefix, hole.suffix, self._options(hole),
                                         on_step=on_step)
        except QueueFull as full:
            yield BUSY + str(full.retry_after_s).encode()
            return
        finished = asyncio.wrap_future(request.future)
        try:
            while not finished.done() or not steps.empty():
                if steps.empty():
                    waiting = asyncio.ensure_future(steps.get())
                    await asyncio.wait({waiting, finished},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not waiting.done():
                        waiting.cancel()
                        continue
                    step = waiting.result()
                else:
                    step = steps.get_nowait()
                yield PROGRESS + msgspec.json.encode(list(step))
            result = finished.result()
        finally:
            request.cancel()
        yield FILLED + self._filled(hole, result, began)

    def _filled(self, hole: wire.Hole, result: Any, began: float) -> bytes:
        model_ms = (time.perf_counter() - began) * 1e3
        prompt_tokens = (len(self.tokenizer.encode(hole.prefix, add_special_tokens=False).ids)
                         + len(self.tokenizer.encode(hole.suffix, add_special_tokens=False).ids))
        return msgspec.json.encode(Filled(
            result.text, prompt_tokens, result.tokens, wire.DiffusionStats(
                result.steps, result.full_passes, result.finish_reason, model_ms, self.replica)))

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=1.0)


class Filled(msgspec.Struct):
    text: str
    prompt_tokens: int
    completion_tokens: int
    stats: wire.DiffusionStats


def _replica_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Ray Serve (tests): no name
        return f"pid{os.getpid()}"


# -- the HTTP gateway ----------------------------------------------------------------------------


BUSY_MESSAGE = "the model's queue is full; retry after the Retry-After seconds"


class _Busy(Exception):
    """A replica answered BUSY in the middle of a next edit."""

    def __init__(self, answer: bytes) -> None:
        super().__init__("busy")
        self.answer = answer


class Refused(Exception):
    """A request refused before it reaches a replica: the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def read_body(request: Any, limit: int = MAX_BODY_BYTES,
                    timeout_s: float = BODY_READ_TIMEOUT_S) -> bytes:
    """The request's body, at most `limit` bytes, within `timeout_s`; raises Refused.

    A declared Content-Length over the limit is refused before a byte of the body is read; a
    chunked body (no length) is read chunk by chunk and refused as soon as it passes the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise Refused(400, f"Content-Length is not a number: {declared[:40]!r}") from None
        if length > limit:
            raise Refused(413, f"request body of {length} bytes is over the limit of {limit}")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise Refused(408, f"the request body did not arrive within {timeout_s:.0f} s") from None


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    from starlette.responses import Response

    return Response(body, status_code=status, media_type="application/json", headers=headers)


class Gateway:
    """Ingress: checks the token, decodes the request, asks a replica, encodes the answer.
    `infiller` is anything with `fill(bytes) -> bytes` and `info() -> str` awaitable the
    Ray Serve way (`await infiller.fill.remote(body)`)."""

    def __init__(self, infiller: Any, config: ServiceConfig, replicas: int) -> None:
        self.infiller = infiller
        self.config = config
        self.replicas = replicas
        self.metrics = Metrics()
        self._description: str | None = None

    async def __call__(self, request: Any) -> Any:
        path, method = request.url.path.rstrip("/") or "/", request.method
        endpoint = path if path in (*COMPLETION_PATHS, edit_wire.EDIT_PATH, wire.MODELS_PATH,
                                    wire.HEALTH_PATH, wire.METRICS_PATH) else "other"
        response = await self._route(request, path, method)
        self.metrics.record(endpoint, response.status_code)
        return response

    async def _route(self, request: Any, path: str, method: str) -> Any:
        if path == wire.HEALTH_PATH:
            return await self.health()
        if not authorized(request.headers.get("authorization"), self.config.token_sha256):
            return _json(wire.error_body("missing or wrong bearer token", "authentication_error",
                                         "invalid_api_key"), 401,
                         {"WWW-Authenticate": 'Bearer realm="diffusion-lsp"'})
        if path in COMPLETION_PATHS or path == edit_wire.EDIT_PATH:
            if method != "POST":
                return _json(wire.error_body(f"{path} takes POST"), 405, {"Allow": "POST"})
            try:
                body = await read_body(request)
            except Refused as refused:
                return _json(wire.error_body(str(refused)), refused.status,
                             {"Connection": "close"})
            if path == edit_wire.EDIT_PATH:
                return await self.edit(body)
            return await self.complete(COMPLETION_PATHS[path], body)
        if path == wire.MODELS_PATH:
            return _json(msgspec.json.encode({"object": "list", "data": [
                {"id": self.config.model_name, "object": "model", "owned_by": APP_NAME}]}))
        if path == wire.METRICS_PATH:
            if request.query_params.get("format") == "json":
                return _json(msgspec.json.encode(self.metrics.snapshot()))
            from starlette.responses import PlainTextResponse

            return PlainTextResponse(self.metrics.prometheus(),
                                     media_type="text/plain; version=0.0.4")
        return _json(wire.error_body(f"no such endpoint: {method} {path}", code="not_found"), 404)

    async def complete(self, decode: Any, body: bytes) -> Any:
        began = time.perf_counter()
        try:
            hole = decode(body)
        except wire.WireError as error:
            return _json(wire.error_body(str(error)), 400)
        if hole.model and hole.model != self.config.model_name:
            log.debug("request for model %r served by %r", hole.model, self.config.model_name)
        if hole.stream:
            return self.stream(hole, began)
        try:
            with self.metrics.in_flight():
                answer = await self.infiller.fill.remote(msgspec.json.encode(hole))
        except Exception as error:  # noqa: BLE001 - every replica failure becomes a 5xx
            return self._failure(error)
        if answer.startswith(BUSY):
            return self._busy(answer)
        filled = msgspec.json.decode(answer, type=Filled)
        latency_ms = (time.perf_counter() - began) * 1e3
        self.metrics.record_completion(latency_ms, filled.stats, filled.completion_tokens)
        response = wire.completion_response(self.config.model_name, filled.text,
                                            filled.prompt_tokens, filled.completion_tokens,
                                            filled.stats)
        return _json(msgspec.json.encode(response))

    def stream(self, hole: wire.Hole, began: float) -> Any:
        """`stream: true`: server-sent events (`wire.StreamChunk`), one per denoising step,
        then the answer and `data: [DONE]`; a failure mid-stream is one error event."""
        from starlette.responses import StreamingResponse

        parts = self.infiller.options(stream=True).fill_stream.remote(msgspec.json.encode(hole))
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        model_name = self.config.model_name

        async def events():
            with self.metrics.in_flight():
                try:
                    async for part in parts:
                        if part.startswith(BUSY):
                            self.metrics.queue_full += 1
                            yield wire.sse(wire.error_body(BUSY_MESSAGE, "server_error",
                                                           "overloaded"))
                            break
                        if part.startswith(PROGRESS):
                            step, steps, text = msgspec.json.decode(part[len(PROGRESS):])
                            yield wire.step_chunk(request_id, model_name, step, steps, text)
                            continue
                        filled = msgspec.json.decode(part[len(FILLED):], type=Filled)
                        self.metrics.record_completion((time.perf_counter() - began) * 1e3,
                                                       filled.stats, filled.completion_tokens)
                        response = wire.completion_response(
                            model_name, filled.text, filled.prompt_tokens,
                            filled.completion_tokens, filled.stats)
                        response.id = request_id
                        yield wire.final_chunk(response)
                    yield wire.SSE_DONE
                except Exception as error:  # noqa: BLE001 - the status is sent: say it in the stream
                    log.warning("streamed completion failed: %s", error)
                    yield wire.sse(wire.error_body(f"the model failed: {type(error).__name__}",
                                                   "server_error"))
                finally:
                    parts.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def edit(self, body: bytes) -> Any:
        """`POST /v1/edit/completions` (Inception's next-edit contract): the editable region
        re-denoised hole by hole (model/decoding/next_edit.py), each hole filled by a replica."""
        began = time.perf_counter()
        try:
            request, prompt = edit_wire.decode_edit(body)
        except wire.WireError as error:
            return _json(wire.error_body(str(error)), 400)
        site = next_edit.Site(prompt.above, prompt.region, prompt.cursor, prompt.below,
                              prompt.history, next_edit.comment_for(prompt.path))
        usage = [0, 0]

        async def fill(prefix: str, suffix: str, hole: next_edit.Hole) -> tuple[str, int]:
            encoded = msgspec.json.encode(wire.Hole(
                request.model, prefix, suffix, hole.max_tokens, (), 0.0,
                min_tokens=0 if hole.may_be_empty else None))
            answer = await self.infiller.fill.remote(encoded)
            if answer.startswith(BUSY):
                raise _Busy(answer)
            filled = msgspec.json.decode(answer, type=Filled)
            usage[0] += filled.prompt_tokens
            usage[1] += filled.completion_tokens
            return filled.text, filled.stats.steps

        try:
            with self.metrics.in_flight():
                region, _ = await next_edit.rewrite(site, next_edit.DEFAULT_STRATEGY,
                                                    next_edit.estimate_tokens, fill)
        except _Busy as busy:
            return self._busy(busy.answer)
        except Exception as error:  # noqa: BLE001 - every replica failure becomes a 5xx
            return self._failure(error)
        log.debug("edit: %.0f ms", (time.perf_counter() - began) * 1e3)
        response = edit_wire.edit_response(self.config.model_name,
                                           prompt.region if region is None else region,
                                           usage[0], usage[1])
        return _json(msgspec.json.encode(response))

    def _busy(self, answer: bytes) -> Any:
        """429 with the replica's Retry-After: its engine's queue was full."""
        self.metrics.queue_full += 1
        retry_after = answer[len(BUSY):].decode() or "1"
        return _json(wire.error_body(BUSY_MESSAGE, "server_error", "overloaded"), 429,
                     {"Retry-After": retry_after})

    def _failure(self, error: Exception) -> Any:
        name = type(error).__name__
        if name == "BackPressureError":  # Ray's router queue is full (max_queued)
            return self._busy(BUSY + b"1")
        log.warning("completion failed: %s", error)
        return _json(wire.error_body(f"the model failed: {name}", "server_error"), 500)

    async def health(self) -> Any:
        if self._description is None:
            try:
                self._description = await asyncio.wait_for(
                    _awaitable(self.infiller.info.remote()), HEALTH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - not ready (or not answering): say so
                return _json(msgspec.json.encode(wire.Health("starting", model="",
                                                             replicas=0)), 503)
        return _json(msgspec.json.encode(wire.Health(
            "ok", model=f"{self.config.model_name}: {self._description}",
            replicas=self.replicas)))


async def _awaitable(response: Any) -> Any:
    return await response


# -- building and running ------------------------------------------------------------------------


def build_app(config: ServiceConfig) -> Application:
    """The Ray Serve application: a gateway in front of the model replicas."""
    import ray
    from ray import serve

    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
    else:  # `serve run` builds the app before it starts Ray: count this machine's GPUs
        import torch

        gpus = torch.cuda.device_count()
    options = infiller_options(config, gpus)
    device = replica_device(config, options)
    replicas = options.get("num_replicas") or config.min_replicas or 1
    infiller = serve.deployment(name="Infiller", **options)(Infiller)
    gateway = serve.deployment(
        name="Gateway", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
        graceful_shutdown_wait_loop_s=GRACEFUL_SHUTDOWN_WAIT_S)(Gateway)
    return gateway.bind(infiller.bind(config, device), config, replicas)


def app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run` / `serve deploy` (import path
    `diffusion_lsp.service:app`); `args` are ServiceConfig's fields. The token's SHA-256 comes
    from `args["token_sha256"]`, else from DIFFUSION_LSP_TOKEN where the app is built."""
    known = set(ServiceConfig.__annotations__)
    if unknown := sorted(set(args) - known):
        raise ValueError(f"unknown argument(s) {unknown}; known: {sorted(known)}")
    fields = dict(args)
    for name in ("replicas", "min_replicas", "max_replicas", "max_batch", "max_queued"):
        if fields.get(name) is not None:
            fields[name] = int(fields[name])
    if fields.get("cpus_per_replica") is not None:
        fields["cpus_per_replica"] = float(fields["cpus_per_replica"])
    fields.setdefault("token_sha256", token_digest(os.environ.get(TOKEN_ENV)))
    return build_app(ServiceConfig(**fields))


class _Stop(BaseException):
    """A signal arrived while starting: unwind to the shutdown."""


def _model_path(args: argparse.Namespace) -> str | None:
    """--model, or the bundled model, or (with a warning) the tiny random-weight stand-in."""
    if args.model is not None:
        return str(args.model)
    from model.network.loader import bundled_model_path

    if bundled_model_path() is not None:
        return None
    from model.network.load import tiny_fallback

    return str(tiny_fallback())


def run_service(args: argparse.Namespace) -> int:
    """Start Ray (or join `--address`), deploy, serve until SIGTERM/SIGINT, stop it all."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(TOKEN_ENV) or None
    problem = binding_problem(args.host, token)
    if problem:
        print(f"diffusion-lsp service: {problem}", file=sys.stderr)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        print("diffusion-lsp service needs Ray Serve: pip install 'diffusion-lsp[service]'",
              file=sys.stderr)
        return 2
    try:
        config = ServiceConfig(
            model=_model_path(args), family=args.family, device=args.device, dtype=args.dtype,
            quantization=args.quantization,
            family_overrides=tuple(parse_overrides(args.family_override).items()),
            replicas=args.replicas, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, cpus_per_replica=args.cpus_per_replica,
            max_batch=args.max_batch, max_queued=args.max_queued, batching=args.batching,
            token_sha256=token_digest(token))
    except ValueError as error:
        print(f"diffusion-lsp service: {error}", file=sys.stderr)
        return 2

    phase = {"now": "starting"}
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if phase["now"] == "starting":
            phase["now"] = "stopping"
            raise _Stop
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
    code = 0
    try:
        if args.address:
            ray.init(address=args.address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
                     object_store_memory=OBJECT_STORE_BYTES, logging_level=logging.WARNING)
        for sig in (signal.SIGTERM, signal.SIGINT):  # ray.init may have installed its own
            signal.signal(sig, on_signal)
        logging_config = {"log_level": args.log_level.upper(), "enable_access_log": False}
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "request_timeout_s": REQUEST_TIMEOUT_S},
                    logging_config=logging_config)
        serve.run(build_app(config), name=APP_NAME, route_prefix="/",
                  logging_config=logging_config)
        phase["now"] = "serving"
        shown = {k: v for k, v in asdict(config).items() if k != "token_sha256"}
        print(f"diffusion-lsp service: ready on http://{args.host}:{args.port} "
              f"({'bearer token required' if token else 'no token'}); {shown}",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    except _Stop:
        pass
    except Exception as error:  # noqa: BLE001 - say why, then still shut down
        log.exception("the service failed: %s", error)
        code = 1
    finally:
        phase["now"] = "stopping"
        print("diffusion-lsp service: stopping", file=sys.stderr, flush=True)
        _shutdown(bool(args.address))
    return code


def _shutdown(joined: bool) -> None:
    """Stop what this command started: our app (and Serve and Ray, unless we only joined)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            if joined:
                serve.delete(APP_NAME)
            else:
                _bounded(serve.shutdown, SERVE_SHUTDOWN_S)
        except Exception as error:  # noqa: BLE001 - Ray itself is stopped next regardless
            log.warning("stopping Ray Serve: %s", error)
        ray.shutdown()
    print("diffusion-lsp service: stopped", file=sys.stderr, flush=True)



def _bounded(call: Any, seconds: float) -> None:
    """Run `call`, giving up waiting after `seconds`. When a signal went to our whole process
    group (systemd's default, `timeout`), Ray's own processes got it too: Serve's controller is
    dead and `serve.shutdown()` would wait 30 s for it; `ray.shutdown()` cleans up anyway."""
    worker = threading.Thread(target=call, name="serve-shutdown", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        log.warning("Ray Serve did not stop within %.0f s; stopping Ray", seconds)
