"""The remote backend: holes filled by a server speaking the FIM completions API (`wire.py`).

That server is our own `diffusion-lsp service`, Inception's Mercury API, or any server with
OpenAI's `/v1/completions` and `suffix`. One `httpx.AsyncClient` keeps connections open.

Policy, in one place:

- every completion has one deadline, `remote.timeoutMs`, retries included: a completion that
  comes later than that is of no use to the editor;
- 429, 5xx and lost connections are retried (`remote.retries` times) after an exponential
  backoff with jitter, honouring a short `Retry-After`, never sleeping past the deadline;
- 401/403 → `BackendError(kind="unauthorized")`, unreachable or no answer in time →
  `kind="unavailable"`, anything else (a 400, an answer we cannot read) → `kind="failed"`;
- cancelling the task that awaits `complete` aborts the HTTP request: httpx closes the
  connection, and our service cancels the hole at its next denoising step;
- the API key (from `remote.apiKey`, else the environment variable `remote.apiKeyEnv`) lives
  only in the client's headers: never in a log line, a message or an exception.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

import httpx
import msgspec

from diffusion_contract import edit_wire, wire
from lsp_server.backends.base import (
    BackendError,
    CompletionJob,
    CompletionOutcome,
    HolesJob,
    HolesOutcome,
    NextEditJob,
    NextEditOutcome,
    estimate_tokens,
)
from lsp_server.settings import RemoteSettings, Settings

log = logging.getLogger(__name__)

MERCURY_HOST = "inceptionlabs.ai"  # Inception's API: no /health, a key is required
MERCURY_DEFAULT_MODEL = "mercury-edit-2"  # Inception's FIM model, when remote.model is ours
OUR_DEFAULT_MODEL = "diffusion-lsp"  # RemoteSettings.model's default
BACKOFF_FIRST_S = 0.1  # the first retry waits about this long, each next one twice as long
BACKOFF_MAX_S = 2.0
RETRY_AFTER_MAX_S = 5.0  # a longer Retry-After is not waited for: the completion is given up
PROBE_TIMEOUT_S = 3.0  # start(): how long /health and /v1/models may take, at most
UNAUTHORIZED = (401, 403)
RATE_LIMITED = 429
FINISH_FROM_API = {"length": "max_tokens", "stop": "end"}
T = TypeVar("T")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine: traffic to it never leaves."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoints:
    """Where the API lives. `remote.url` may end in `/v1` (as Inception writes it) or not."""

    root: str  # scheme://host[:port][/prefix], without /v1
    host: str

    @classmethod
    def parse(cls, url: str) -> Endpoints:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(
                f"remote.url must look like http(s)://host[:port], got {url!r}", "failed")
        path = parts.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        return cls(f"{parts.scheme}://{parts.netloc}{path}", parts.hostname)

    @property
    def mercury(self) -> bool:
        return self.host == MERCURY_HOST or self.host.endswith("." + MERCURY_HOST)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def secure(self) -> bool:
        return self.root.startswith("https://") or self.loopback

    def url(self, path: str) -> str:
        return self.root + path


def api_key(remote: RemoteSettings, environ: Mapping[str, str] = os.environ) -> str:
    """The key from the setting, else from the environment variable it names; "" for none."""
    if remote.api_key:
        return remote.api_key
    return environ.get(remote.api_key_env, "") if remote.api_key_env else ""


def backoff_s(attempt: int, retry_after: str | None = None) -> float:
    """How long to wait before retry `attempt` (0-based): the server's Retry-After when it gives
    seconds, else exponential with jitter (half to all of BACKOFF_FIRST_S * 2**attempt)."""
    if retry_after:
        try:
            return max(0.0, float(retry_after.strip()))
        except ValueError:
            pass  # an HTTP date: use our own backoff
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt)
    return ceiling * (0.5 + random.random() / 2)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to its first stop word (a server may ignore `stop`), and whether it was cut."""
    cuts = [index for word in stop if word and (index := text.find(word)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _connection_problem(error: httpx.TransportError) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:200] + "…"


class _Retry(Exception):
    """One attempt failed in a way worth retrying; carries what to report if none succeeds."""

    def __init__(self, error: BackendError, retry_after: str | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class RemoteBackend:
    """A FIM completions API over HTTP, as a Backend."""

    name = "remote"

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport  # tests may pass one; None = the network
        self._client: httpx.AsyncClient | None = None
        self._endpoints: Endpoints | None = None
        self._remote = RemoteSettings()
        self._model = OUR_DEFAULT_MODEL
        self._ours = False  # the remote is our service: it also takes the sampler's settings
        self._mercury = False  # Inception's API contract (its host, or remote.api "mercury")

    # -- Backend ---------------------------------------------------------------------------------

    async def start(self, settings: Settings, report: Callable[[str], None]) -> str:
        """Check the remote once. Raises only when it can never work as set up (a bad URL, no
        key for Mercury, a refused key); an unreachable remote is reported and the backend
        starts anyway: completions fail with `unavailable` until the remote answers."""
        await self.close()
        remote = settings.remote
        endpoints = Endpoints.parse(remote.url)
        key = api_key(remote)
        mercury = endpoints.mercury or remote.api == "mercury"
        if endpoints.mercury and not key:  # a gateway or stand-in may take none
            raise BackendError(
                f"Mercury's API needs a key: set the environment variable "
                f"{remote.api_key_env or 'DIFFUSION_LSP_TOKEN'} (or remote.apiKey)",
                "unauthorized")
        if key and not endpoints.secure:
            report(f"warning: the API key travels unencrypted to {endpoints.root}; "
                   "use https:// (or an SSH tunnel) beyond this machine")
        self._remote, self._endpoints, self._ours = remote, endpoints, False
        self._mercury = mercury
        self._model = (MERCURY_DEFAULT_MODEL if mercury and
                       remote.model == OUR_DEFAULT_MODEL else remote.model)
        headers = {"Accept": "application/json", "User-Agent": "diffusion-lsp"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            headers=headers, timeout=remote.timeout_ms / 1e3, transport=self._transport,
            trust_env=not endpoints.loopback)  # no proxy between us and this machine
        report(f"checking {endpoints.root}")
        return await self._probe(report)

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        if self._client is None or self._endpoints is None:
            raise BackendError("the remote backend is not started", "unavailable")
        path = wire.COMPLETIONS_PATH if self._remote.api == "completions" else wire.FIM_PATH
        request = self._request(job)
        streaming = self.streams(job)
        if streaming:
            request.stream = True
        body = msgspec.json.encode(request)

        async def attempt(deadline: float, began: float) -> CompletionOutcome:
            if streaming:
                return await self._stream(job, path, body, deadline, began)
            return self._outcome(job, await self._post(path, body, deadline), began)

        return await self._exchange(attempt)

    async def next_edit(self, job: NextEditJob) -> NextEditOutcome:
        """The region rewritten by `POST /v1/edit/completions` (Inception's next-edit contract,
        which our service speaks too): the prompt's sections in one user message."""
        if self._client is None or self._endpoints is None:
            raise BackendError("the remote backend is not started", "unavailable")
        body = msgspec.json.encode(edit_wire.edit_request(self._model, job.prompt,
                                                          job.max_tokens))

        async def attempt(deadline: float, began: float) -> NextEditOutcome:
            return self._edit_outcome(await self._post(edit_wire.EDIT_PATH, body, deadline),
                                      began)

        return await self._exchange(attempt)

    def _edit_outcome(self, response: httpx.Response, began: float) -> NextEditOutcome:
        try:
            region = edit_wire.decode_edit_response(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise BackendError(f"unreadable answer from {response.url}: {error}",
                               "failed") from None
        elapsed = (time.perf_counter() - began) * 1e3
        return NextEditOutcome(region, 0, elapsed, {"remote": self._endpoints.root
                                                    if self._endpoints else ""})

    async def _exchange(self, attempt: Callable[[float, float], Awaitable[T]]) -> T:
        """Run `attempt(deadline, began)` (one POST, its 200 answer read) under the policy of
        the module's docstring: retries with backoff within the deadline."""
        timeout_s = self._remote.timeout_ms / 1e3
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        tries = 0
        while True:
            began = time.perf_counter()
            try:
                return await attempt(deadline, began)
            except _Retry as retry:
                if tries >= self._remote.retries:
                    raise retry.error from None
                delay = backoff_s(tries, retry.retry_after)
                if delay > RETRY_AFTER_MAX_S or loop.time() + delay >= deadline:
                    raise retry.error from None
                log.debug("retrying in %.2f s: %s", delay, retry.error)
                await asyncio.sleep(delay)
                tries += 1

    def streams(self, job: CompletionJob) -> bool:
        """Whether `job` is streamed: it wants previews, and the remote is our service's FIM
        API (which streams each denoising step as a server-sent event)."""
        return job.on_step is not None and self._ours and self._remote.api == "fim"

    async def _stream(self, job: CompletionJob, path: str, body: bytes, deadline: float,
                      began: float) -> CompletionOutcome:
        """One streamed attempt: each step's event goes to `job.on_step`, the last event is
        the answer. Errors as `_post`'s, before the first event; a broken stream after it
        fails the completion (its steps were already shown)."""
        assert self._client is not None and self._endpoints is not None
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise self._timed_out()
        try:
            return await asyncio.wait_for(
                self._read_stream(job, path, body, remaining, began), remaining)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            raise self._timed_out() from None
        except httpx.TransportError as error:
            raise _Retry(BackendError(f"cannot reach {self._endpoints.root}: "
                                      f"{_connection_problem(error)}", "unavailable")) from None

    async def _read_stream(self, job: CompletionJob, path: str, body: bytes, timeout: float,
                           began: float) -> CompletionOutcome:
        assert self._client is not None and self._endpoints is not None and job.on_step
        where = self._endpoints.root
        async with self._client.stream(
                "POST", self._endpoints.url(path), content=body, timeout=timeout,
                headers={"Content-Type": "application/json",
                         "Accept": "text/event-stream"}) as response:
            if response.status_code != 200:
                await response.aread()
                self._refuse(response)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                try:
                    chunk = wire.decode_chunk(line[len("data:"):])
                except (msgspec.DecodeError, msgspec.ValidationError) as error:
                    raise BackendError(f"unreadable stream event from {where}: {error}",
                                       "failed") from None
                if chunk is None:
                    break
                if isinstance(chunk, wire.ErrorResponse):
                    raise BackendError(f"{where} failed mid-stream: {chunk.error.message}",
                                       "failed")
                choice = chunk.choices[0]
                if choice.finish_reason is None:
                    info = chunk.diffusion
                    if isinstance(info, wire.StepInfo):
                        job.on_step(info.step, info.steps, choice.content)
                    continue
                return self._stream_outcome(job, chunk, began)
        raise BackendError(f"{where} ended the stream without an answer", "failed")

    def _stream_outcome(self, job: CompletionJob, chunk: wire.StreamChunk,
                        began: float) -> CompletionOutcome:
        choice = chunk.choices[0]
        text, was_cut = cut_at_stop(choice.content, job.stop + (("\n",) if job.single_line
                                                                else ()))
        info = chunk.diffusion if isinstance(chunk.diffusion, wire.StepInfo) else None
        finish = (info.finish_reason if info is not None and isinstance(info.finish_reason, str)
                  else FINISH_FROM_API.get(choice.finish_reason or "stop", "end"))
        model_ms = info.model_ms if info is not None and isinstance(info.model_ms, float) else (
            time.perf_counter() - began) * 1e3
        tokens = chunk.usage.completion_tokens if isinstance(chunk.usage, wire.Usage) else 0
        return CompletionOutcome(
            text=text, steps=info.step if info is not None else 0, tokens=tokens,
            model_ms=model_ms, finish_reason="stop" if was_cut else finish,
            extra={"remote": self._endpoints.root if self._endpoints else "", "streamed": True,
                   "http_ms": (time.perf_counter() - began) * 1e3})

    async def fill_holes(self, job: HolesJob) -> HolesOutcome:
        """One hole after another through `complete` (the APIs take one hole): each sees the
        holes before it filled and the markers after it as they are."""
        texts: list[str] = []
        steps, began = 0, time.perf_counter()
        for index in range(len(job.markers)):
            before = job.pieces[0] + "".join(
                (text or marker) + piece for text, marker, piece in
                zip(texts, job.markers, job.pieces[1:], strict=False))
            after = job.pieces[index + 1] + "".join(
                marker + piece for marker, piece in
                zip(job.markers[index + 1:], job.pieces[index + 2:], strict=True))
            outcome = await self.complete(CompletionJob(
                prefix=before, suffix=after, max_tokens=job.max_tokens, single_line=False,
                threshold=job.threshold, tokens_per_step=job.tokens_per_step,
                sampler=job.sampler))
            texts.append(outcome.text)
            steps += outcome.steps
        return HolesOutcome(texts, steps, (time.perf_counter() - began) * 1e3, joint=False)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # -- one request -----------------------------------------------------------------------------

    def _request(self, job: CompletionJob) -> wire.FimRequest | wire.CompletionsRequest:
        stop = list(job.stop)
        if job.single_line and "\n" not in stop:
            stop.append("\n")
        stop_field = stop[: wire.MAX_STOP_WORDS] if stop else msgspec.UNSET
        request: wire.FimRequest | wire.CompletionsRequest
        if self._remote.api != "completions":  # fim, or Inception's (FIM) contract
            request = wire.FimRequest(model=self._model, prompt=job.prefix, suffix=job.suffix,
                                      max_tokens=job.max_tokens, stop=stop_field,
                                      temperature=0.0)
        else:
            request = wire.CompletionsRequest(model=self._model, prompt=job.prefix,
                                              suffix=job.suffix, max_tokens=job.max_tokens,
                                              stop=stop_field, temperature=0.0)
        request.temperature = job.sampler.temperature
        if self._ours:  # only our service takes the sampler's settings
            given = {**msgspec.structs.asdict(job.sampler), "threshold": job.threshold,
                     "tokens_per_step": job.tokens_per_step}
            for setting in wire.EXTENSIONS:
                setattr(request, setting.name, given[setting.name])
        return request

    async def _post(self, path: str, body: bytes, deadline: float) -> httpx.Response:
        """One attempt. Returns a 200 answer; raises _Retry or BackendError."""
        assert self._client is not None and self._endpoints is not None
        remaining = deadline - asyncio.get_running_loop().time()
        where = self._endpoints.root
        if remaining <= 0:
            raise self._timed_out()
        try:  # httpx's timeout bounds each read; wait_for bounds the whole exchange
            response = await asyncio.wait_for(self._client.post(
                self._endpoints.url(path), content=body, timeout=remaining,
                headers={"Content-Type": "application/json"}), remaining)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            raise self._timed_out() from None
        except httpx.TransportError as error:
            raise _Retry(BackendError(f"cannot reach {where}: {_connection_problem(error)}",
                                      "unavailable")) from None
        if response.status_code == 200:
            return response
        self._refuse(response)

    def _refuse(self, response: httpx.Response) -> NoReturn:
        """A non-200 answer as _Retry (429, 5xx) or BackendError (401/403, other 4xx)."""
        assert self._endpoints is not None
        where, status = self._endpoints.root, response.status_code
        message = wire.error_message(response.content)
        if status in UNAUTHORIZED:
            raise BackendError(
                f"{where} refused the API key ({status}: {message}); check "
                f"{self._remote.api_key_env or 'remote.apiKey'}", "unauthorized")
        if status == RATE_LIMITED or status >= 500:
            raise _Retry(BackendError(f"{where} answered {status}: {message}", "failed"),
                         response.headers.get("Retry-After"))
        raise BackendError(f"{where} rejected the request ({status}: {message})", "failed")

    def _timed_out(self) -> BackendError:
        where = self._endpoints.root if self._endpoints else "the remote"
        return BackendError(f"no answer from {where} within {self._remote.timeout_ms} ms",
                            "unavailable")

    def _outcome(self, job: CompletionJob, response: httpx.Response,
                 began: float) -> CompletionOutcome:
        try:
            answer = wire.decode_response(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise BackendError(f"unreadable answer from {response.url}: {error}",
                               "failed") from None
        choice = answer.choices[0]
        text, was_cut = cut_at_stop(choice.content, job.stop + (("\n",) if job.single_line
                                                                else ()))
        stats = answer.diffusion if isinstance(answer.diffusion, wire.DiffusionStats) else None
        if stats is not None:
            finish, steps, model_ms = stats.finish_reason, stats.steps, stats.model_ms
        else:
            finish = FINISH_FROM_API.get(choice.finish_reason or "stop", "end")
            steps, model_ms = 0, (time.perf_counter() - began) * 1e3
        if was_cut:
            finish = "stop"
        extra = {"remote": self._endpoints.root if self._endpoints else "",
                 "http_ms": (time.perf_counter() - began) * 1e3}
        if stats is not None:
            extra.update(full_passes=stats.full_passes, replica=stats.replica)
        return CompletionOutcome(text=text, steps=steps, tokens=answer.usage.completion_tokens,
                                 model_ms=model_ms, finish_reason=finish, extra=extra)

    # -- start -----------------------------------------------------------------------------------

    async def _probe(self, report: Callable[[str], None]) -> str:
        """Describe the remote: ours (from /health) or another server; raises on a refused key."""
        assert self._client is not None and self._endpoints is not None
        endpoints = self._endpoints
        timeout = min(PROBE_TIMEOUT_S, self._remote.timeout_ms / 1e3)
        what = f"{self._model} at {endpoints.root}"
        try:
            if not self._mercury:
                health = await self._client.get(endpoints.url(wire.HEALTH_PATH), timeout=timeout)
                what = self._describe_health(health) or what
            models = await self._client.get(endpoints.url(wire.MODELS_PATH), timeout=timeout)
        except httpx.TimeoutException:
            problem = f"no answer within {timeout * 1e3:.0f} ms"
        except httpx.TransportError as error:
            problem = _connection_problem(error)
        else:
            if models.status_code in UNAUTHORIZED:
                raise BackendError(
                    f"{endpoints.root} refused the API key ({models.status_code}: "
                    f"{wire.error_message(models.content)}); check "
                    f"{self._remote.api_key_env or 'remote.apiKey'}", "unauthorized")
            return what
        report(f"{endpoints.root} is not reachable now ({problem}); "
               "completions will fail until it is")
        return f"{what} (not reachable at start: {problem})"

    def _describe_health(self, response: httpx.Response) -> str | None:
        """'diffusion-lsp service at URL (model, N replicas)' when the remote is ours."""
        if response.status_code != 200:
            return None
        try:
            health = msgspec.json.decode(response.content, type=wire.Health)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if health.service != wire.SERVICE_NAME:
            return None
        self._ours = True
        root = self._endpoints.root if self._endpoints else ""
        return (f"{wire.SERVICE_NAME} service at {root} ({health.model or 'model'}, "
                f"{health.replicas} replica{'s' if health.replicas != 1 else ''})")
