"""The seam between the language server and a model: the Backend protocol and its types.

The server cuts the context and cleans the text; a backend only fills a hole. Cancelling the
task awaiting `complete` cancels the work (the engine drops the hole at its next step; the
remote closes the HTTP request). `local` and `remote` implement the protocol on top of this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from diffusion_contract.edit_wire import EditPrompt
from lsp_server.settings import SamplerSettings, Settings

CHARS_PER_TOKEN = 3.5  # token estimate for backends without a local tokenizer


class BackendError(RuntimeError):
    """A backend could not start or answer. `kind`: unavailable | unauthorized | failed |
    restarted (its engine's worker died and was restarted: this request failed, later ones are
    served) | stopped (the backend serves no more until it is restarted) | busy (its queue is
    full: this request gets nothing, later ones are served)."""

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
    threshold: float | None = None  # None: the model's (`Family.threshold`), else 0.9
    tokens_per_step: int | None = None
    sampler: SamplerSettings = field(default_factory=SamplerSettings)  # reference samplers
    document: str | None = None  # the document's URI: a local engine reuses its context
    # called with (step, expected steps, the hole as it stands) after each step but the last,
    # from any thread; None: no previews (`model.decoding.preview` draws the hole)
    on_step: Callable[[int, int, str], None] | None = None


@dataclass(frozen=True)
class HolesJob:
    """Several holes of one document, filled jointly: `pieces` is the text around them (one
    more piece than holes, context already cut); `markers` what stands in each hole now (a
    backend filling them one after another leaves the others' markers in place)."""

    pieces: tuple[str, ...]
    markers: tuple[str, ...]
    max_tokens: int  # per hole
    threshold: float | None = None  # None: the model's (`Family.threshold`), else 0.9
    tokens_per_step: int | None = None
    sampler: SamplerSettings = field(default_factory=SamplerSettings)


@dataclass
class HolesOutcome:
    texts: list[str]  # one per hole; "" where the model left it empty
    steps: int = 0
    model_ms: float = 0.0
    joint: bool = True  # False: filled one after another (a backend without joint filling)


@dataclass
class CompletionOutcome:
    text: str
    steps: int = 0  # forward passes (0 when the backend does not say)
    tokens: int = 0
    model_ms: float = 0.0  # time spent filling the hole, as the backend measured it
    finish_reason: str = "end"
    extra: dict = field(default_factory=dict)
    # the probability its least sure token was committed with (None: the backend does not
    # say; then no confidence floor applies)
    confidence: float | None = None


@dataclass(frozen=True)
class NextEditJob:
    """One editable region to rewrite, with what the editor did (the prompt's pieces)."""

    prompt: EditPrompt
    max_tokens: int  # the rewritten region, at most
    threshold: float | None = None  # None: the model card's (`Family.threshold`), else 0.9
    strategy: str = "region"  # the local rewrite's (model.decoding.next_edit.STRATEGIES)
    comment: str = "#"  # the language's line comment (the local rewrite lays history out so)
    document: str | None = None  # a local engine reuses this key's context between holes


@dataclass
class NextEditOutcome:
    region: str | None  # the region rewritten; None: the backend predicts no edit
    steps: int = 0
    model_ms: float = 0.0
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str

    async def start(self, settings: Settings, report: Callable[[str], None]) -> str:
        """Get ready (load the model, check the remote); returns a one-line description.
        `report` shows progress messages. Raises BackendError."""

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        """Fill the hole. Raises BackendError; cancellation propagates."""

    async def fill_holes(self, job: HolesJob) -> HolesOutcome:
        """Fill several holes (jointly where the backend can). As `complete`."""

    async def next_edit(self, job: NextEditJob) -> NextEditOutcome:
        """Rewrite the editable region. Raises BackendError; cancellation propagates."""

    def count_tokens(self, text: str) -> int:
        """Tokens `text` costs (estimated where the backend has no tokenizer)."""

    async def close(self) -> None: ...


def estimate_tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + 1 if text else 0
