"""Several holes of one text filled jointly: every hole masked in one sequence, denoised together.

A left-to-right model fills one gap at a time and never sees what it will write in the next. A
bidirectional diffusion model can mask every gap at once: each step is one forward pass over
`piece_0 [hole_0] piece_1 [hole_1] ... piece_n`, and each hole's positions see the others as
they stand (masked, or committed). The confidence threshold runs across all holes jointly: the
model commits whatever it is sure of, wherever it is (Fast-dLLM's parallel decoding, Wu et al.,
2025; LLaDA's low-confidence remasking order, Nie et al., 2025).

Length, per hole:
- a per-hole budget of `max_tokens` masks, cut at the first end-of-hole token (the bundled
  model pads a hole with <|endofhole|>; a committed end closes the rest of its hole only);
- DreamOn (a family with expand/delete tokens) starts each hole at `initial_tokens` and edits
  its length as the model says: a committed <|expand|> becomes two masks, a <|delete|>
  disappears (Wu et al., 2025, DreamOn), never past `max_tokens`, each hole with its own
  expand budget (as one hole has).

Each hole is a span: a `model.decoding.hole.HoleState` with the one-hole rules (its bans, closing at
an end, DreamOn's edits, stop words and single-line, its finish and its text), and a step is the
one-hole sampler's step over all spans at once (`model.decoding.sampler.apply_spans_step`: one
selection across the holes, under the options' rule). Full passes only (no context cache):
the holes are spread through the sequence. Step budgets and blocks schedule one hole: several
holes commit by the threshold or `tokens_per_step`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffusion_contract.options import InfillOptions
from model.decoding.hole import HoleState, final_text, layout_pieces
from model.decoding.passes import forward_holes
from model.decoding.preview import expected_steps, hole_preview
from model.decoding.sampler import apply_spans_step, new_state_from_ids
from model.network.loader import LoadedModel


@dataclass
class MultiHoleState:
    """Holes between fixed pieces: pieces[i] comes before spans[i]; pieces[-1] after the last.
    A span's own prefix and suffix are the pieces on either side of it."""

    pieces: list[list[int]]  # token ids; bos in the first, eos in the last where the family has
    spans: list[HoleState]  # one per hole, sharing the options and the generator
    options: InfillOptions
    steps: int = 0
    committed: int = 0  # tokens committed by steps, all holes together
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def live(self) -> list[HoleState]:
        """The holes still being denoised."""
        return [span for span in self.spans if not span.finished]

    def canvas(self) -> HoleState:
        """The whole sequence as one hole for a forward pass (`model.decoding.passes`): the first
        piece before it, the last after it, every span and inner piece in between; masked where a
        hole still being denoised is. Its logits come in span order."""
        hole, masked = [], []
        for index, span in enumerate(self.spans):
            if index:
                piece = torch.tensor(self.pieces[index], dtype=torch.long)
                hole.append(piece)
                masked.append(torch.zeros(piece.numel(), dtype=torch.bool))
            hole.append(span.hole)
            masked.append(span.masked & (not span.finished))
        return HoleState(self.pieces[0], self.pieces[-1], torch.cat(hole), torch.cat(masked),
                         dataclasses.replace(self.options, reuse_context=False))


@dataclass
class MultiInfill:
    """The result of filling several holes jointly."""

    texts: list[str]  # one per hole, in order; "" for a hole the model left empty
    steps: int  # forward passes made
    tokens: list[int]  # real tokens per hole
    finish_reason: str  # end | max_tokens | cancelled
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds


def new_multi_state(model: LoadedModel, pieces: Sequence[str], options: InfillOptions,
                    code_start: bool = False) -> MultiHoleState:
    """The state for `len(pieces) - 1` holes, each between two consecutive pieces, laid out as
    one hole is (`layout_pieces`). Each hole is `max_tokens` masks (DreamOn's: its first
    guess, then its own edits). With `code_start`, no hole starts with blank space (a
    marker's hole begins after its line's indentation: code goes there)."""
    if len(pieces) < 2:
        raise ValueError("several holes need at least two pieces (the text around one hole)")
    if options.steps is not None or options.block_length is not None:
        raise ValueError("several holes commit by the threshold or tokens_per_step: a step "
                         "budget (steps) and blocks schedule one hole")
    encoded = layout_pieces(model, pieces)
    if model.ids.expand is None:  # the hole's whole budget at once, as it never grows
        options = dataclasses.replace(options, initial_tokens=options.max_tokens)
    generator = torch.Generator().manual_seed(options.seed)
    spans = []
    for before, after in zip(encoded, encoded[1:], strict=False):
        span = new_state_from_ids(model, before, after, options)
        span.generator, span.code_start = generator, code_start
        spans.append(span)
    return MultiHoleState(encoded, spans, options)


def hole_logits(model: LoadedModel, state: MultiHoleState) -> list[torch.Tensor]:
    """One full forward pass over the whole sequence: the logits (m_i, V) of every
    still-masked position of each hole still being denoised (`MultiHoleState.live`)."""
    logits = forward_holes(model, [state.canvas()])[0]  # (m, V), in span order
    return list(logits.split([int(span.masked.sum()) for span in state.live()]))


def multi_step(model: LoadedModel, state: MultiHoleState, logits: Sequence[torch.Tensor]) -> None:
    """Commit tokens across all holes from one forward pass (`hole_logits`): the one-hole step
    over every hole still being denoised. The holes are done when each is finished: at
    `max_tokens` if one ended there, else at their ends."""
    state.committed += apply_spans_step(model, state.live(), logits)
    state.steps += 1
    if not state.live():
        full = any(span.finish_reason == "max_tokens" for span in state.spans)
        state.finish_reason = "max_tokens" if full else "end"


def hole_texts(model: LoadedModel, state: MultiHoleState) -> tuple[list[str], list[int]]:
    """Each hole's text (`model.decoding.hole.final_text`) and its count of real tokens."""
    texts, counts = zip(*(final_text(model, span) for span in state.spans), strict=True)
    return list(texts), list(counts)


def multi_preview(model: LoadedModel, state: MultiHoleState) -> tuple[int, int, list[str]]:
    """(step, expected steps, each hole as it stands) -- `model.decoding.preview` for
    several holes."""
    texts = [hole_preview(model, span.hole.tolist(), span.masked.tolist())
             for span in state.spans]
    masked = sum(int(span.masked.sum()) for span in state.live())
    return state.steps, expected_steps(state.steps, state.committed, masked,
                                       state.options.tokens_per_step), texts


def infill_holes(
    model: LoadedModel,
    pieces: Sequence[str],
    options: InfillOptions | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[MultiHoleState], None] | None = None,
    code_start: bool = False,
) -> MultiInfill:
    """Fill the `len(pieces) - 1` holes between consecutive `pieces` jointly. `options`:
    max_tokens is each hole's budget, min_tokens its least length; threshold / tokens_per_step
    / score / temperature / seed as for one hole (the reference samplers' step budgets and
    blocks do not apply here). `should_stop` is polled before each step; `on_step` sees the
    state after each step but the last (previews). `code_start`: see `new_multi_state`."""
    options = options or InfillOptions()
    if model.family.block_length:
        return holes_in_turn(model, pieces, options, should_stop)
    started = time.perf_counter()
    state = new_multi_state(model, pieces, options, code_start)
    forward_s = 0.0
    while not state.finished:
        if should_stop is not None and should_stop():
            break
        before = time.perf_counter()
        logits = hole_logits(model, state)
        forward_s += time.perf_counter() - before
        multi_step(model, state, logits)
        if on_step is not None and not state.finished:
            on_step(state)
    texts, counts = hole_texts(model, state)
    timings = {"forward_ms": forward_s * 1e3,
               "total_ms": (time.perf_counter() - started) * 1e3}
    return MultiInfill(texts, state.steps, counts, state.finish_reason or "cancelled", timings)


def holes_in_turn(model: LoadedModel, pieces: Sequence[str], options: InfillOptions,
                  should_stop: Callable[[], bool] | None = None) -> MultiInfill:
    """A block-diffusion family (`model.decoding.block`) denoises after its prompt only, so its
    holes are filled one at a time, left to right, each by the one-hole sampler in the family's FIM
    layout: a hole sees the holes before it filled and the text after it (later holes
    empty). No per-step previews here."""
    from model.decoding.sampler import infill

    started = time.perf_counter()
    texts: list[str] = []
    tokens: list[int] = []
    steps, reason, before = 0, "end", pieces[0]
    for index in range(1, len(pieces)):
        result = infill(model, before, "".join(pieces[index:]), options, should_stop)
        steps += result.steps
        if result.finish_reason == "cancelled":
            reason = "cancelled"
            break
        if result.finish_reason == "max_tokens":
            reason = "max_tokens"
        texts.append(result.text)
        tokens.append(result.tokens)
        before += result.text + pieces[index]
    missing = len(pieces) - 1 - len(texts)  # holes a cancel left unfilled
    return MultiInfill(texts + [""] * missing, steps, tokens + [0] * missing, reason,
                       {"total_ms": (time.perf_counter() - started) * 1e3})
