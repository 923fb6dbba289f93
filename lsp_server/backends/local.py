"""The local backend: the diffusion engine, in this process, on this machine's CPU or GPU."""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

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
from lsp_server.settings import Settings

T = TypeVar("T")


class LocalBackend:
    """The diffusion engine, in this process."""

    name = "local"

    def __init__(self) -> None:
        self.engine = None
        self._tokenizer = None
        self.min_confidence = 0.0  # the loaded model's calibrated floor (model.catalog.paths)
        self.preview_notice: str | None = None  # said with the bundled model's first offer

    async def start(self, settings: Settings, report: Callable[[str], None]) -> str:
        model_settings = settings.model
        report(f"loading {model_settings.path or 'the bundled model'}")
        # importing torch and transformers takes seconds: not on the event loop, which keeps
        # answering (no items) meanwhile
        await asyncio.to_thread(importlib.import_module, "model.engine")
        from model.decoding.prompt_cache import PromptCache
        from model.engine import Engine

        documents = model_settings.context_cache_documents
        cache = PromptCache(max_documents=documents) if documents > 0 else None
        # the engine's own thread loads and then runs the model: every torch call on one
        # thread (Engine.start says why)
        try:
            engine = await asyncio.wrap_future(
                Engine.start(lambda: _load(settings), warm_up=False, prompt_cache=cache))
        except Exception as error:  # noqa: BLE001 - every load failure is reported the same way
            raise BackendError(load_failure(error, settings.model.device), "unavailable"
                               ) from error
        loaded = engine.model
        self._tokenizer = loaded.tokenizer
        report("warming up")
        try:
            await asyncio.to_thread(engine.warm_up)
        except Exception as error:  # noqa: BLE001 - a model that cannot run one hole is no use
            await asyncio.to_thread(engine.close)
            raise BackendError(load_failure(error, settings.model.device), "unavailable"
                               ) from error
        self.engine = engine
        from model.catalog.paths import PREVIEW_NOTICE, bundled_model_path, min_confidence

        self.min_confidence = min_confidence(loaded.path)
        self.preview_notice = PREVIEW_NOTICE if loaded.path == bundled_model_path() else None
        if loaded.quantization_notice:
            report(loaded.quantization_notice)  # said once, as the model loads
        parameters = sum(p.numel() for p in loaded.network.parameters())
        bits = "" if loaded.quantization == "none" else f", {loaded.quantization} weights"
        return (f"{loaded.path.name} ({loaded.family.name}, {parameters / 1e6:.1f}M parameters"
                f"{bits}) on {loaded.device.type}")

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None or not text:
            return estimate_tokens(text)
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        if self.engine is None:
            raise BackendError("the model is not loaded", "unavailable")
        from diffusion_contract.options import hole_options

        try:
            options = hole_options(
                job.max_tokens, threshold=self._threshold(job.threshold),
                tokens_per_step=job.tokens_per_step, single_line=job.single_line, stop=job.stop,
                **msgspec.structs.asdict(job.sampler))
        except ValueError as error:  # settings the sampler refuses: no completion, say why
            raise BackendError(f"sampler settings: {error}") from error
        began = time.perf_counter()
        result = await self._on_engine(self.engine.infill(job.prefix, job.suffix, options,
                                                          job.document, self._previews(job)))
        return CompletionOutcome(
            text=result.text, steps=result.steps, tokens=result.tokens,
            model_ms=(time.perf_counter() - began) * 1e3, finish_reason=result.finish_reason,
            extra={"full_passes": result.full_passes, "reused_tokens": result.reused_tokens},
            confidence=result.confidence.lowest if result.confidence is not None else None)

    def _threshold(self, given: float | None) -> float | None:
        """The threshold a job asked for, else the one the model's card runs with (None: the
        sampler's default)."""
        return given if given is not None else self.engine.model.family.threshold

    async def _on_engine(self, work: Awaitable[T]) -> T:
        """`work`'s result; every engine failure becomes one BackendError (`engine_failure`),
        a cancellation propagates."""
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every engine failure becomes one message
            raise engine_failure(error, self.engine.model.device.type) from error

    def _previews(self, job: CompletionJob):
        """The engine's per-step callback drawing the hole for `job.on_step` (None: none)."""
        if job.on_step is None:
            return None
        from model.decoding.preview import state_preview

        model, report = self.engine.model, job.on_step

        def on_step(state) -> None:
            report(*state_preview(model, state))

        return on_step

    async def fill_holes(self, job: HolesJob) -> HolesOutcome:
        """The holes masked in one sequence and denoised jointly (`model.decoding.multi_hole`), on
        the engine's worker between two batched steps."""
        if self.engine is None:
            raise BackendError("the model is not loaded", "unavailable")
        from diffusion_contract.options import hole_options
        from model.decoding.multi_hole import infill_holes

        sampler = job.sampler
        try:  # joint filling samples as the threshold sampler does: no reference algorithms
            options = hole_options(
                job.max_tokens, threshold=self._threshold(job.threshold),
                tokens_per_step=job.tokens_per_step, temperature=sampler.temperature,
                top_p=sampler.top_p, top_k=sampler.top_k, seed=sampler.seed)
        except ValueError as error:
            raise BackendError(f"sampler settings: {error}") from error
        pieces = list(job.pieces)
        began = time.perf_counter()
        result = await self._on_engine(self.engine.run(
            lambda model, should_stop: infill_holes(model, pieces, options, should_stop,
                                                    code_start=True)))
        return HolesOutcome(result.texts, result.steps, (time.perf_counter() - began) * 1e3)

    async def next_edit(self, job: NextEditJob) -> NextEditOutcome:
        """The region re-denoised by the engine, hole by hole (model.decoding.next_edit)."""
        if self.engine is None:
            raise BackendError("the model is not loaded", "unavailable")
        from diffusion_contract.options import hole_options
        from model.decoding.next_edit import Hole, Site, rewrite

        engine = self.engine

        async def fill(prefix: str, suffix: str, hole: Hole) -> tuple[str, int]:
            options = hole_options(hole.max_tokens, threshold=self._threshold(job.threshold),
                                   min_tokens=0 if hole.may_be_empty else 1)
            # in the background: a completion asked meanwhile is denoised first
            result = await engine.infill(prefix, suffix, options, job.document,
                                         background=True)
            return result.text, result.steps

        prompt = job.prompt
        site = Site(prompt.above, prompt.region, prompt.cursor, prompt.below, prompt.history,
                    job.comment)
        began = time.perf_counter()
        try:
            region, steps = await rewrite(site, job.strategy, self.count_tokens, fill)
        except asyncio.CancelledError:
            raise
        except ValueError as error:  # an unknown strategy
            raise BackendError(str(error)) from error
        except Exception as error:  # noqa: BLE001 - every engine failure becomes one message
            raise engine_failure(error, engine.model.device.type) from error
        return NextEditOutcome(region, steps, (time.perf_counter() - began) * 1e3)

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
            self.engine = None


def load_failure(error: Exception, device: str) -> str:
    """One line for a model that did not load. The loader's own errors already say what is
    wrong and where; out-of-memory and anything unexpected get their first line, named."""
    from model.engine import first_line, is_out_of_memory
    from model.network.loader import ModelLoadError

    line = first_line(error)
    if isinstance(error, ModelLoadError):
        return line
    if is_out_of_memory(error):
        return (f"the model does not fit in memory on {device} ({line}); choose a "
                "smaller model, model.dtype bfloat16, or model.device cpu")
    return f"the model did not load ({type(error).__name__}: {line})"


def engine_failure(error: Exception, device: str) -> BackendError:
    """What the user is told when the engine fails a hole: one line, with what to do."""
    from model.engine import (
        Cancelled,
        EngineStopped,
        QueueFull,
        WorkerRestarted,
        first_line,
        is_out_of_memory,
    )

    if isinstance(error, QueueFull):
        return BackendError(str(error), "busy")
    if is_out_of_memory(error):
        return BackendError(
            f"the model ran out of memory on {device} (cached memory was freed; later "
            "completions try again; lower completion.maxTokens or context.prefixTokens if this "
            "repeats)", "failed")
    if isinstance(error, WorkerRestarted):
        # the same words every time: the user is told once, however often it happens
        return BackendError("the model engine's worker failed and was restarted; completions "
                            "go on (the log has the details)", "restarted")
    if isinstance(error, EngineStopped):
        return BackendError(f"{error}; reload the model (change a model setting or restart "
                            "the server)", "stopped")
    if isinstance(error, Cancelled):
        return BackendError("the engine is shutting down", "unavailable")
    return BackendError(f"the model failed ({type(error).__name__}: {first_line(error)})",
                        "failed")


def _load(settings: Settings):
    import torch

    from model.network.loader import load_model
    from model.network.shapes import is_random, load_random

    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    if is_random(settings.model.path):  # a benchmark's random-weight model of a published shape
        return load_random(settings.model.path, settings.model.device, settings.model.dtype,
                           settings.model.quantization)
    return load_model(settings.model.path, settings.model.family, settings.model.device,
                      settings.model.dtype, overrides=settings.model.family_overrides,
                      quantization=settings.model.quantization)
