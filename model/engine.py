"""The engine: one worker thread owns the model and serves infill requests from anywhere.

Requests arrive from any thread (`submit`) or asyncio task (`infill`). The worker keeps a set
of active holes and runs one denoising step for all of them in a single batched forward pass
(`forward_holes` pads and masks, so batching never changes a result). A cancelled request
leaves at the next step; a new request joins at the next step.

The worker heals itself: an exception outside a denoising step (a bug) fails the requests in
flight with `WorkerRestarted`, and the worker's loop starts again after a backoff, on the same
thread (every torch call stays on one thread, see `Engine.start`), at most
`restarts_per_minute` times in any minute; past that the engine stops (`EngineStopped`) and
every waiting and later caller is told so at once.

The batch is bounded by count (`max_batch`) and by memory (`max_batch_bytes`: what the active
holes hold, `hole_bytes`; by default half the accelerator's free memory, DEFAULT_CPU_BATCH_BYTES
on a CPU): a request that does not fit waits, first come first served, and joins when holes
leave. At most `max_queued` requests wait; past that `submit` raises `QueueFull` at once (the
service answers 429 with Retry-After), so a burst is refused, not queued without end.

Completions come first: a request submitted with `background=True` (a next edit's rewrite) is
stepped only while no foreground request is active; one that was running waits, its state
kept, while foreground holes are denoised, and goes on after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusion_contract.options import InfillOptions
from model.decoding.hole import HoleState, Infill
from model.decoding.hole import result as state_result
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import denoise_step, infill, new_state
from model.network.loader import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUED = 64  # requests waiting for a place in the batch, at most; then QueueFull
DEFAULT_CPU_BATCH_BYTES = 4 << 30  # the batch's memory bound on a CPU ...
CUDA_FREE_SHARE = 0.5  # ... and on an accelerator: this share of its free memory at first use
QUEUE_RETRY_AFTER_S = 1  # what a refused caller is told to wait (the service's Retry-After)
_STOP = object()  # queue sentinel
# one small infill that runs both a full and a hole-only pass
WARM_UP_HOLE = ("def warm_up():\n    return ", "\n")
WARM_UP_OPTIONS = InfillOptions(max_tokens=8, initial_tokens=8, tokens_per_step=4)
RESTARTS_PER_MINUTE = 3  # a worker that dies more often than this stays dead
RESTART_BACKOFF_S = 0.5  # the first restart's wait; doubled for each restart in the last minute
RESTART_WINDOW_S = 60.0


class Cancelled(Exception):
    """The request was cancelled before its hole was filled."""


class EngineStopped(RuntimeError):
    """The worker died more often than it may be restarted; the engine serves no more."""


class QueueFull(RuntimeError):
    """The engine's queue holds `max_queued` requests already: this one is refused at once
    (retry after `retry_after_s` seconds)."""

    def __init__(self, waiting: int, retry_after_s: int = QUEUE_RETRY_AFTER_S) -> None:
        super().__init__(f"the model is busy: {waiting} requests wait already; retry in "
                         f"{retry_after_s} s")
        self.retry_after_s = retry_after_s


class WorkerRestarted(RuntimeError):
    """The worker died (a bug outside a denoising step) while this request was in flight; it
    is being restarted, and later requests are served."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the accelerator running out of memory (torch raises
    `torch.OutOfMemoryError`, a RuntimeError, for CUDA and for other devices alike)."""
    return isinstance(error, torch.OutOfMemoryError)


def hole_bytes(model: LoadedModel, state: HoleState) -> int:
    """Memory a hole holds while it is in the batch, at most: every layer's keys and values of
    its whole sequence (twice: its context cache, and a step's copy beside its window), its
    window's activations through the MLP, and its logits (float32, one row a hole token)."""
    config = model.network.config
    element = torch.empty((), dtype=model.dtype).element_size()
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hole = max(state.options.max_tokens, state.hole.numel()) + 1
    rows = len(state.prefix_ids) + len(state.suffix_ids) + hole
    keys_values = 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * dim * rows
    activations = hole * (4 * config.hidden_size + 3 * config.intermediate_size)
    return (keys_values + activations) * element + hole * config.vocab_size * 4


def batch_budget(device: torch.device) -> int:
    """The batch's memory bound where none is given (see the module's docstring)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_SHARE)
    return DEFAULT_CPU_BATCH_BYTES


def free_memory(device: torch.device) -> None:
    """Hand cached blocks back after an out-of-memory step, so the next step can allocate."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Request:
    """One hole in flight. `future` resolves to an `Infill`, or raises `Cancelled`."""

    id: int
    state: HoleState
    submitted: float
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokenize_ms: float = 0.0
    forward_s: float = 0.0
    started: float | None = None
    document: str | None = None  # the document's key (its URI): its context is reused
    # sees the state after every step but the last, on the worker thread (a live preview)
    on_step: Callable[[HoleState], None] | None = None
    background: bool = False  # stepped only while no foreground request is active


    def cancel(self) -> None:
        """Ask the worker to drop this request at its next step."""
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> Infill:
        return self.future.result(timeout)


@dataclass
class Task:
    """Work that needs the model to itself for a while (several holes filled jointly, which do
    not batch with single holes): run on the worker between two batched steps. `run(model,
    should_stop)` polls `should_stop` between its own steps."""

    run: Callable[[LoadedModel, Callable[[], bool]], Any]
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Owns a loaded model; fills holes for many callers, batching their denoising steps."""

    def __init__(
        self, model: LoadedModel, max_batch: int = DEFAULT_MAX_BATCH, warm_up: bool = False,
        prompt_cache: PromptCache | None = None, restarts_per_minute: int = RESTARTS_PER_MINUTE,
        backoff_s: float = RESTART_BACKOFF_S, max_queued: int = DEFAULT_MAX_QUEUED,
        max_batch_bytes: int | None = None,
    ) -> None:
        """Serve `model` from a new worker thread. Prefer `Engine.start` where the model is not
        loaded yet: it loads in the worker itself, which on a CPU is much faster (see there).
        With a `prompt_cache`, requests that name their document reuse its context
        (`model.decoding.prompt_cache`). A dying worker is restarted after `backoff_s` (doubled for
        each restart in the last minute), at most `restarts_per_minute` times a minute.
        `max_queued`, `max_batch_bytes`: the bounds of the module's docstring."""
        self._setup(max_batch, prompt_cache, restarts_per_minute, backoff_s, max_queued,
                    max_batch_bytes)
        self.model = model
        self._thread = threading.Thread(target=self._serve, name="diffusion-engine", daemon=True)
        self._thread.start()
        if warm_up:
            self.warm_up()

    @classmethod
    def start(cls, load: Callable[[], LoadedModel], max_batch: int = DEFAULT_MAX_BATCH,
              warm_up: bool = True, prompt_cache: PromptCache | None = None,
              restarts_per_minute: int = RESTARTS_PER_MINUTE,
              backoff_s: float = RESTART_BACKOFF_S, max_queued: int = DEFAULT_MAX_QUEUED,
              max_batch_bytes: int | None = None) -> Future:
        """A future of an engine whose worker thread loads the model itself (and warms it up)
        before serving; the future holds the load's exception if it fails.

        Every torch operation then runs on one native thread. Each thread that runs torch ops
        gets its own OpenMP team, and once a process holds more OpenMP workers than it has
        cores, libgomp stops spin-waiting between parallel regions: on the 2-core CPU VM, the
        bundled model loaded in one thread and run in another infilled in 197 ms (p50),
        loaded and run in the same thread in 109 ms.
        """
        engine = cls.__new__(cls)
        engine._setup(max_batch, prompt_cache, restarts_per_minute, backoff_s, max_queued,
                      max_batch_bytes)
        ready: Future = Future()

        def load_then_serve() -> None:
            try:
                engine.model = load()
                if warm_up:
                    infill(engine.model, *WARM_UP_HOLE, WARM_UP_OPTIONS)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits `ready`
                ready.set_exception(exc)
                return
            ready.set_result(engine)
            engine._serve()

        engine._thread = threading.Thread(target=load_then_serve, name="diffusion-engine",
                                          daemon=True)
        engine._thread.start()
        return ready

    def _setup(self, max_batch: int, prompt_cache: PromptCache | None,
               restarts_per_minute: int, backoff_s: float, max_queued: int = DEFAULT_MAX_QUEUED,
               max_batch_bytes: int | None = None) -> None:
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.max_batch_bytes = max_batch_bytes  # None: `batch_budget` at the first admission
        self._held: deque[Request] = deque()  # taken from the queue, waiting for memory
        self.rejected = 0  # requests refused with QueueFull
        self.prompt_cache = prompt_cache  # touched by the worker thread only
        self._queue: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._closed = False
        self._closing = threading.Event()  # cuts a restart's backoff short
        self.restarts_per_minute = restarts_per_minute
        self.backoff_s = backoff_s
        self._restart_times: deque[float] = deque()  # monotonic times of recent restarts
        self.restarts = 0  # times the worker died and was restarted
        self.last_death: str | None = None  # what killed the worker last, in one line
        self.failure: EngineStopped | None = None  # set when the worker stays dead
        self.out_of_memory = 0  # steps that ran out of memory (their requests failed)
        self.forward_passes = 0
        self.batched_rows = 0

    def warm_up(self) -> None:
        """Run one small infill (full and hole-only passes), so the first real one is not slow."""
        self.submit(*WARM_UP_HOLE, WARM_UP_OPTIONS).result()

    # -- callers -------------------------------------------------------------------------------

    def submit(self, prefix: str, suffix: str, options: InfillOptions | None = None,
               document: str | None = None,
               on_step: Callable[[HoleState], None] | None = None,
               background: bool = False) -> Request:
        """Queue a hole (of `document`, when named); returns at once. Thread-safe. `on_step`
        is called on the worker thread after each of the hole's steps but the last; it must be
        quick (hand the state's picture to another thread), and what it raises is logged. A
        `background` hole yields to every foreground one (see the module's docstring)."""
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise RuntimeError("engine is closed")
        if (waiting := self.waiting) >= self.max_queued:
            self.rejected += 1
            raise QueueFull(waiting)
        began = time.perf_counter()
        state = new_state(self.model, prefix, suffix, options or InfillOptions())
        request = Request(next(self._ids), state, submitted=began, document=document,
                          on_step=on_step, background=background)
        request.tokenize_ms = (time.perf_counter() - began) * 1e3
        self._queue.put(request)
        if self.failure is not None:  # the worker died while this one was being queued
            self._fail_queued(self.failure)
        return request

    async def infill(
        self, prefix: str, suffix: str, options: InfillOptions | None = None,
        document: str | None = None, on_step: Callable[[HoleState], None] | None = None,
        background: bool = False,
    ) -> Infill:
        """Fill a hole from asyncio; cancelling the awaiting task cancels the request."""
        request = self.submit(prefix, suffix, options, document, on_step, background)
        try:
            return await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:
            request.cancel()
            raise

    def call(self, run: Callable[[LoadedModel, Callable[[], bool]], Any]) -> Task:
        """Queue `run(model, should_stop)` for the worker (see `Task`); returns at once."""
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise RuntimeError("engine is closed")
        task = Task(run)
        self._queue.put(task)
        if self.failure is not None:
            self._fail_queued(self.failure)
        return task

    async def run(self, run: Callable[[LoadedModel, Callable[[], bool]], Any]) -> Any:
        """`call` from asyncio; cancelling the awaiting task stops the work at its next step."""
        task = self.call(run)
        try:
            return await asyncio.wrap_future(task.future)
        except asyncio.CancelledError:
            task.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker; requests still in flight are cancelled."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests (and tasks) waiting for a place in the batch, cancelled ones not counted
        (they leave when the worker reaches them: a burst of superseded requests must not
        keep the newest one out)."""
        with self._queue.mutex:
            queued = list(self._queue.queue)
        return sum(not _is_cancelled(item) for item in (*queued, *self._held))

    # -- worker --------------------------------------------------------------------------------

    def _take_new(self, active: list[Request], block: bool) -> bool:
        """Move queued requests into `active` while they fit (`_fits`), first come first
        served; False when told to stop. Background requests do not take a foreground one's
        place in the batch (`stepping` picks who runs)."""
        while sum(not r.background for r in active) < self.max_batch:
            if self._held:
                if not self._fits(active, self._held[0]):
                    return True
                self._admit(active, self._held.popleft())
                continue
            try:
                item = self._queue.get(block=block and not active)
            except queue.Empty:
                return True
            if item is _STOP:
                return False
            if isinstance(item, Task):
                self._run_task(item)
                continue
            if not self._fits(active, item):
                self._held.append(item)
                return True
            self._admit(active, item)
        return True

    def _fits(self, active: list[Request], request: Request) -> bool:
        """Whether `request` fits the batch's memory bound beside `active` (alone, it always
        fits: a hole over the bound runs by itself)."""
        if not active:
            return True
        if self.max_batch_bytes is None:
            self.max_batch_bytes = batch_budget(self.model.device)
        held = sum(hole_bytes(self.model, r.state) for r in active)
        return held + hole_bytes(self.model, request.state) <= self.max_batch_bytes

    def _admit(self, active: list[Request], request: Request) -> None:
        request.started = time.perf_counter()
        active.append(request)  # first: should attaching fail, the death fails it too
        if self.prompt_cache is not None:
            self.prompt_cache.attach(self.model, request.document, request.state)

    def _run_task(self, task: Task) -> None:
        """Run a task now; its future gets the value, the error, or `Cancelled` (unless its
        awaiter already cancelled the future itself)."""
        outcome: BaseException | None = None
        value = None
        if task.cancelled.is_set() or task.future.done():
            outcome = Cancelled("task cancelled")
        else:
            try:
                value = task.run(self.model, task.cancelled.is_set)
            except Exception as exc:  # nothing the model does may take the worker down
                if is_out_of_memory(exc):
                    self._out_of_memory(exc, 1)
                else:
                    log.exception("a task on the engine failed")
                outcome = exc
            passes = getattr(value, "steps", 0)  # a result that says its forward passes
            self.forward_passes += passes if isinstance(passes, int) else 0
            if outcome is None and task.cancelled.is_set():
                outcome = Cancelled("task cancelled")
        with contextlib.suppress(InvalidStateError):  # the awaiter cancelled it meanwhile
            if outcome is not None:
                task.future.set_exception(outcome)
            else:
                task.future.set_result(value)

    def _serve(self) -> None:
        """The worker's body: `_run`, restarted when it raises. The requests in flight when it
        died get `WorkerRestarted`; queued ones wait for the restart (the backoff is bounded).
        Past `restarts_per_minute` restarts in a minute, every waiting caller gets
        `EngineStopped` (and so does every later `submit`) instead of waiting forever."""
        while True:
            active: list[Request] = []
            try:
                self._run(active)
                return
            except BaseException as exc:  # noqa: BLE001 - the loop died: tell its callers
                self.last_death = f"{type(exc).__name__}: {first_line(exc)}"
                delay = self._restart_delay()
                if delay is None:
                    log.critical("the engine's worker stopped (%d restarts in the last "
                                 "minute)", len(self._restart_times), exc_info=exc)
                    self.failure = EngineStopped(f"the model engine stopped ({self.last_death})")
                    self._fail(active, self.failure)
                    self._fail_queued(self.failure)
                    return
                log.error("the engine's worker died; restarting it in %.1f s", delay,
                          exc_info=exc)
                self._fail(active, WorkerRestarted(
                    f"the model engine's worker failed ({self.last_death}) and was restarted"))
                self._forget_contexts()
                self.restarts += 1
                self._closing.wait(delay)  # close() cuts it short; `_run` then takes _STOP

    def _restart_delay(self) -> float | None:
        """Seconds to wait before the next restart, or None when the worker may not be
        restarted again (`restarts_per_minute` already in the last minute)."""
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW_S:
            self._restart_times.popleft()
        if self._closed or len(self._restart_times) >= self.restarts_per_minute:
            return None
        delay = self.backoff_s * 2 ** len(self._restart_times)
        self._restart_times.append(now)
        return delay

    def _forget_contexts(self) -> None:
        """Drop every document's cached context: the dying loop may have been writing one."""
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    @staticmethod
    def _fail(requests: list[Request], error: Exception) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    def _fail_queued(self, error: EngineStopped) -> None:
        self._fail(list(self._held), error)
        self._held.clear()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and not item.future.done():
                item.future.set_exception(error)

    def _run(self, active: list[Request]) -> None:
        running = True
        while running or active:
            if running:
                running = self._take_new(active, block=True)
            if not running:
                for request in [*active, *self._held]:
                    request.cancel()
                active += self._held  # they leave below, cancelled
                self._held.clear()
            active[:] = self._drop_cancelled(active)
            self._held = deque(self._drop_cancelled(list(self._held)))
            if not active:
                continue
            self._step(self.stepping(active))
            active[:] = self._finish(active)

    def stepping(self, active: list[Request]) -> list[Request]:
        """The requests this step runs: the foreground ones, or, when there are none, the
        background ones (a batch at most); the others keep their state and wait."""
        foreground = [r for r in active if not r.background]
        return foreground or [r for r in active if r.background][:self.max_batch]

    def _drop_cancelled(self, active: list[Request]) -> list[Request]:
        keep = []
        for request in active:
            if request.cancelled.is_set():
                if not request.future.done():
                    request.future.set_exception(Cancelled(f"request {request.id} cancelled"))
            else:
                keep.append(request)
        return keep

    def _step(self, active: list[Request]) -> None:
        began = time.perf_counter()
        try:
            denoise_step(self.model, [r.state for r in active], self.prompt_cache,
                         [r.document for r in active])
        except Exception as exc:  # nothing the model does may take the worker down
            if is_out_of_memory(exc):
                self._out_of_memory(exc, len(active))
            else:
                log.exception("denoising step failed for %d request(s)", len(active))
            for request in active:
                if not request.future.done():
                    request.future.set_exception(exc)
                request.cancel()
            return
        elapsed = time.perf_counter() - began
        self.forward_passes += 1
        self.batched_rows += len(active)
        for request in active:
            request.forward_s += elapsed
            self._report_step(request)

    def _report_step(self, request: Request) -> None:
        """The request's `on_step` after a step that did not finish it (not after a cancel)."""
        if request.on_step is None or request.state.finished or request.cancelled.is_set():
            return
        try:
            request.on_step(request.state)
        except Exception:  # a preview must never cost the completion
            log.exception("on_step of request %d failed", request.id)

    def _out_of_memory(self, error: Exception, rows: int) -> None:
        """One log line, then free what the failed step held: its traceback's frames (the
        activations) and the allocator's cached blocks. The step's requests fail; the next
        step starts from a clean allocator."""
        self.out_of_memory += 1
        log.warning("out of memory in a denoising step of %d request(s) on %s; they fail and "
                    "cached memory is freed: %s", rows, self.model.device, first_line(error))
        error.with_traceback(None)
        free_memory(self.model.device)

    def _finish(self, active: list[Request]) -> list[Request]:
        keep = []
        for request in active:
            if request.future.done():
                continue
            if not request.state.finished:
                keep.append(request)
                continue
            now = time.perf_counter()
            timings = {
                "tokenize_ms": request.tokenize_ms,
                "queue_ms": ((request.started or now) - request.submitted) * 1e3,
                "forward_ms": request.forward_s * 1e3,
                "total_ms": (now - request.submitted) * 1e3,
            }
            request.future.set_result(state_result(self.model, request.state, timings))
        return keep


def _is_cancelled(item: object) -> bool:
    cancelled = getattr(item, "cancelled", None)
    return isinstance(cancelled, threading.Event) and cancelled.is_set()


def first_line(error: BaseException) -> str:
    """An exception's message, first line only (torch's out-of-memory message runs to five)."""
    text = str(error).strip()
    return text.split("\n", 1)[0] if text else type(error).__name__
