"""Where completions come from: the seam between the language server and a model.

The server cuts the context and cleans the text; a backend only fills a hole. `LocalBackend`
runs the diffusion engine in this process; `lsp_server.remote.RemoteBackend` calls a FIM
completions API (our service, or Mercury's). Cancelling the task awaiting `complete` cancels
the work (the engine drops the hole at its next step; the remote closes the HTTP request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lsp_server.settings import Settings

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3.5  # token estimate for backends without a local tokenizer


class BackendError(RuntimeError):
    """A backend could not start or answer. `kind`: unavailable | unauthorized | failed |
    stopped (the backend serves no more until it is restarted)."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class CompletionJob:
    """One hole to fill, with the context already cut to budget."""

    prefix: str
    suffix: str
    max_tokens: int
    single_line: bool
    stop: tuple[str, ...] = ()
    threshold: float = 0.9
    tokens_per_step: int | None = None


@dataclass
class CompletionOutcome:
    text: str
    steps: int = 0  # forward passes (0 when the backend does not say)
    tokens: int = 0
    model_ms: float = 0.0  # time spent filling the hole, as the backend measured it
    finish_reason: str = "end"
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str

    async def start(self, settings: Settings, report: Callable[[str], None]) -> str:
        """Get ready (load the model, check the remote); returns a one-line description.
        `report` shows progress messages. Raises BackendError."""

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        """Fill the hole. Raises BackendError; cancellation propagates."""

    def count_tokens(self, text: str) -> int:
        """Tokens `text` costs (estimated where the backend has no tokenizer)."""

    async def close(self) -> None: ...


def estimate_tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + 1 if text else 0


class LocalBackend:
    """The diffusion engine, in this process."""

    name = "local"

    def __init__(self) -> None:
        self.engine = None
        self._tokenizer = None

    async def start(self, settings: Settings, report: Callable[[str], None]) -> str:
        model_settings = settings.model
        report(f"loading {model_settings.path or 'the bundled model'}")
        from model.engine import Engine

        # the engine's own thread loads and then runs the model: every torch call on one
        # thread (Engine.start says why)
        try:
            engine = await asyncio.wrap_future(
                Engine.start(lambda: _load(settings), warm_up=False))
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
        parameters = sum(p.numel() for p in loaded.network.parameters())
        return (f"{loaded.path.name} ({loaded.family.name}, {parameters / 1e6:.1f}M parameters) "
                f"on {loaded.device.type}")

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None or not text:
            return estimate_tokens(text)
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        if self.engine is None:
            raise BackendError("the model is not loaded", "unavailable")
        from model.sampler import InfillOptions

        options = InfillOptions(
            max_tokens=job.max_tokens, initial_tokens=min(16, job.max_tokens),
            threshold=job.threshold, tokens_per_step=job.tokens_per_step,
            single_line=job.single_line, stop=job.stop, min_tokens=1)
        began = time.perf_counter()
        try:
            result = await self.engine.infill(job.prefix, job.suffix, options)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every engine failure becomes one message
            raise engine_failure(error, self.engine.model.device.type) from error
        return CompletionOutcome(
            text=result.text, steps=result.steps, tokens=result.tokens,
            model_ms=(time.perf_counter() - began) * 1e3, finish_reason=result.finish_reason,
            extra={"full_passes": result.full_passes})

    async def close(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)
            self.engine = None


def load_failure(error: Exception, device: str) -> str:
    """One line for a model that did not load. The loader's own errors already say what is
    wrong and where; out-of-memory and anything unexpected get their first line, named."""
    from model.engine import is_out_of_memory
    from model.loader import ModelLoadError

    first_line = (str(error).strip() or type(error).__name__).split("\n", 1)[0]
    if isinstance(error, ModelLoadError):
        return first_line
    if is_out_of_memory(error):
        return (f"the model does not fit in memory on {device} ({first_line}); choose a "
                "smaller model, model.dtype bfloat16, or model.device cpu")
    return f"the model did not load ({type(error).__name__}: {first_line})"


def engine_failure(error: Exception, device: str) -> BackendError:
    """What the user is told when the engine fails a hole: one line, with what to do."""
    from model.engine import Cancelled, EngineStopped, is_out_of_memory

    first_line = (str(error).strip() or type(error).__name__).split("\n", 1)[0]
    if is_out_of_memory(error):
        return BackendError(
            f"the model ran out of memory on {device} (cached memory was freed; later "
            "completions try again; lower completion.maxTokens or context.prefixTokens if this "
            "repeats)", "failed")
    if isinstance(error, EngineStopped):
        return BackendError(f"{error}; reload the model (change a model setting or restart "
                            "the server)", "stopped")
    if isinstance(error, Cancelled):
        return BackendError("the engine is shutting down", "unavailable")
    return BackendError(f"the model failed ({type(error).__name__}: {first_line})", "failed")


def _load(settings: Settings):
    import torch

    from model.loader import load_model

    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    return load_model(settings.model.path, settings.model.family, settings.model.device,
                      settings.model.dtype)


def make_backend(settings: Settings) -> Backend:
    if settings.backend == "remote":
        from lsp_server.remote import RemoteBackend

        return RemoteBackend()
    return LocalBackend()
