"""A hole being denoised (`HoleState`), its layout between prefix and suffix, and how its
text changes: closing at an end token, DreamOn's expand / delete, growing, the final text.

Variable length: a position decoding to the family's end-of-hole token (or pad token) closes
the hole there (every later position becomes end-of-hole too). A hole that fills with real
tokens before it is finished is extended by a fixed `extend_by` masks, up to `max_tokens`. For
DreamOn (Wu et al., 2025), whose model predicts its own edits, a committed <|expand|> becomes
two masks and a committed <|delete|> disappears (`edit_hole`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from diffusion_contract.options import InfillOptions
from model.network.loader import LoadedModel

NEWLINE = "\n"


@dataclass
class StepTrace:
    """One denoising step: what was committed, and the hole after it (mask id where masked)."""

    committed: list[tuple[int, int]]  # (hole position, token id)
    hole: list[int]


@dataclass
class Infill:
    """The result of filling one hole."""

    text: str
    steps: int  # forward passes made
    tokens: int  # hole tokens that are real text (before the text was cut at a stop)
    finish_reason: str  # end | newline | stop | max_tokens | cancelled
    trace: list[StepTrace] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds
    full_passes: int = 0  # of `steps`, those over the whole sequence (the rest: hole only)
    guidance_passes: int = 0  # extra unconditioned passes for cfg_scale (not in `steps`)
    reused_tokens: int = 0  # context tokens whose keys/values came from the document's cache
    # how sure the model was of the text: the lowest and the mean confidence of its tokens when
    # they were committed (`Confidence`); None for an empty text
    confidence: Confidence | None = None


@dataclass(frozen=True)
class Confidence:
    """The confidences (p(token) under the default score) the text's tokens were committed
    with: a completion is as sure as its least sure token (`lowest`)."""

    lowest: float
    mean: float


def text_confidence(scores: list[float], tokens: int) -> Confidence | None:
    """The confidence of a text made of the hole's first `tokens` tokens (None: no tokens)."""
    known = [score for score in scores[:tokens] if not math.isnan(score)]
    if not known:
        return None
    return Confidence(round(min(known), 4), round(sum(known) / len(known), 4))


@dataclass
class ContextCache:
    """Keys and values of every position outside the hole's window, from the last full pass.

    Approximate: they were computed when the hole held what it held then (the dual cache of
    Fast-dLLM, Wu et al., 2025); `refresh_every` bounds how stale they get.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, heads, L - w, head_dim)
    hole_len: int  # the hole's length when cached: growing the hole invalidates the cache
    age: int = 0  # cached steps run since the full pass


class BlockRows(Protocol):
    """The exact keys and values of a block-diffusion sequence's first `length` positions
    (`model.decoding.block.BlockCache`)."""

    length: int
    writes: int


@dataclass(frozen=True)
class BlockRule:
    """How a block-diffusion family denoises its blocks (`model.decoding.block`): its family's
    data, read by the one sampler's steps (`model.decoding.schedules.block_span`, the passes)."""

    length: int  # tokens a block, aligned from the prompt's first token
    # a step commits among this many positions of the block, left to right (Fast-dLLM v2's
    # sub-blocks); equal to `length`: the whole block
    span: int
    # logits shifted inside a block: position i's come from row i - 1, the block's first
    # position's from its own row (Fast-dLLM v2); the first position of a block after written
    # rows comes from the last of them, in the forward that writes them
    shifted: bool = False
    stop: str = "full-block"  # exact mode's end rule (`Family.block_stop`)


class PartialPass(Protocol):
    """A first pass that reuses cached context rows instead of running the whole sequence
    (`model.decoding.prompt_cache.Reuse`): it sets the state's context cache and returns the hidden
    states of its masked positions (m, H)."""

    def run(self, model: LoadedModel, state: HoleState) -> torch.Tensor: ...


@dataclass
class HoleState:
    """A hole being denoised: the fixed prefix and suffix ids around a growing hole."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    hole: torch.Tensor  # (n,) token ids; mask id where still masked
    masked: torch.Tensor  # (n,) bool
    options: InfillOptions
    generator: torch.Generator | None = None
    closed_at: int | None = None  # positions >= this are end-of-hole
    finish_reason: str | None = None
    steps: int = 0
    full_passes: int = 0  # forward passes over the whole sequence (the rest ran the hole only)
    trace: list[StepTrace] = field(default_factory=list)
    context: ContextCache | None = None
    guidance_passes: int = 0  # unconditioned passes run for cfg_scale
    block: int = 0  # the block (block_length) being decoded; 0 without blocks
    block_step: int = 0  # with steps: the schedule step within the block
    block_masks: int = -1  # masks in the block when it began (-1: not begun)
    # DreamOn: expansions still allowed (its `expand_budget`); bounds expand/delete cycles
    expansions_left: int = 0
    reuse: PartialPass | None = None  # the document's cached context rows, for the first pass
    reused_tokens: int = 0
    # block diffusion (`model.decoding.block`): the prompt's length modulo the block length (None: a
    # full-canvas hole); the hole then grows one block at a time
    block_offset: int | None = None
    committed: BlockRows | None = None  # exact keys/values of every finished block and prompt
    block_rule: BlockRule | None = None
    forwards: int = 0  # block diffusion: forward passes run (denoising and writing)
    code_start: bool = False  # the hole's first token may not be blank space (code goes there)

    @property
    def blockwise(self) -> bool:
        return self.block_offset is not None
    # each hole position's confidence when it was committed (NaN: not committed); may be
    # shorter than the hole (positions past its end are not committed yet)
    confidences: list[float] = field(default_factory=list)

    @property
    def hole_start(self) -> int:
        return len(self.prefix_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sequence(self) -> torch.Tensor:
        """(L,) prefix + hole + suffix."""
        prefix = torch.tensor(self.prefix_ids, dtype=torch.long)
        suffix = torch.tensor(self.suffix_ids, dtype=torch.long)
        return torch.cat([prefix, self.hole, suffix])


def encode(model: LoadedModel, text: str) -> list[int]:
    return model.tokenizer.encode(text, add_special_tokens=False).ids if text else []


def layout_ids(model: LoadedModel, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the hole, with the family's bos/eos around them."""
    prefix_ids, suffix_ids = layout_pieces(model, [prefix, suffix])
    return prefix_ids, suffix_ids


def layout_pieces(model: LoadedModel, pieces: Sequence[str]) -> list[list[int]]:
    """Token ids of the pieces of text around `len(pieces) - 1` holes (one hole: the prefix
    and the suffix), with the family's bos before the first and eos after the last; a FIM
    layout (one hole only) puts them all before the hole."""
    family, ids = model.family, model.ids
    encoded = [encode(model, piece) for piece in pieces]
    if family.fim_layout == "suffix-first":  # <fim_suffix> S <fim_prefix> P <fim_middle> hole
        fim = ids.fim
        if fim is None:
            raise ValueError(f"the tokenizer lacks the {family.name} family's FIM tokens "
                             f"({family.fim_suffix_token}, {family.fim_prefix_token}, "
                             f"{family.fim_middle_token}): it cannot fill a hole between a "
                             "prefix and a suffix")
        if len(encoded) != 2:
            raise ValueError(f"family {family.name}'s FIM layout has room for one hole")
        prefix_ids, suffix_ids = encoded
        return [[fim.suffix, *suffix_ids, fim.prefix, *prefix_ids, fim.middle], []]
    if family.fim_layout == "prefix-only":  # the text before the hole, then the hole
        if len(encoded) != 2:
            raise ValueError(f"family {family.name}'s layout has room for one hole")
        return [encoded[0], []]
    needs_bos = family.always_bos or (family.shifted_logits and not encoded[0])
    if needs_bos and ids.bos is not None:
        encoded[0] = [ids.bos, *encoded[0]]
    if ids.eos is not None:
        encoded[-1] = [*encoded[-1], ids.eos]
    if family.shifted_logits and not encoded[0]:
        raise ValueError(f"family {family.name} needs a token before the hole and has no bos")
    return encoded


def is_end(model: LoadedModel, token: int) -> bool:
    return token == model.ids.end_of_hole or token in model.ids.extra_end


def close_hole(state: HoleState, model: LoadedModel, position: int) -> None:
    """Masks from `position` on become end-of-hole: the hole is shorter than guessed.

    Tokens already committed there stay (a committed token never changes); the text ends at
    the first end token anyway.
    """
    tail = state.masked[position:]
    state.hole[position:][tail] = model.ids.end_of_hole
    tail[:] = False
    state.closed_at = position if state.closed_at is None else min(state.closed_at, position)


def open_text(model: LoadedModel, state: HoleState) -> str:
    """Text of the committed run at the start of the hole (up to the first mask or end)."""
    run = []
    for token, masked in zip(state.hole.tolist(), state.masked.tolist(), strict=True):
        if masked or is_end(model, token):
            break
        run.append(token)
    return model.tokenizer.decode(run, skip_special_tokens=False)


def text_settled_by_end(model: LoadedModel, state: HoleState) -> bool:
    """The committed run at the hole's start ends at a committed end token: the text can no
    longer change, whatever the positions after it become (exact mode stops here; the
    references would go on decoding positions that the text never reads)."""
    for token, masked in zip(state.hole.tolist(), state.masked.tolist(), strict=True):
        if masked:
            return False
        if is_end(model, token):
            return True
    return False


def edit_hole(model: LoadedModel, state: HoleState, edits: list[tuple[int, int]]) -> None:
    """DreamOn's variable length (Wu et al., 2025; DreamOn eval/generator.py): a position
    committed as expand becomes two masks, one committed as delete disappears -- and, with the
    family's `delete_pads_right`, so does every still-masked position after the first delete.
    `edits`: (hole position, token) sorted by position. The hole never grows past
    `max_tokens`, nor expands more than `max_tokens` times in all (DreamOn's expand budget);
    its length changed, so the context cache is dropped."""
    ids, family = model.ids, model.family
    hole, masked = state.hole.tolist(), state.masked.tolist()
    deletes = [p for p, t in edits if t == ids.delete]
    drop = set(deletes)
    if deletes and family.delete_pads_right:
        drop |= {p for p in range(deletes[0], len(hole)) if masked[p]}
    expands = {p for p, t in edits if t == ids.expand}
    room = state.options.max_tokens - (len(hole) - len(drop))
    scores = state.confidences + [math.nan] * (len(hole) - len(state.confidences))
    new_hole, new_masked, new_scores, closed_at = [], [], [], state.closed_at
    for position, (token, is_masked) in enumerate(zip(hole, masked, strict=True)):
        if position in drop:
            if closed_at is not None and position < closed_at:
                closed_at -= 1
            continue
        if position in expands:
            copies = 2 if room > 0 and state.expansions_left > 0 else 1
            room -= copies - 1
            state.expansions_left -= copies - 1
            if closed_at is not None and position < closed_at:
                closed_at += copies - 1
            new_hole += [ids.mask] * copies
            new_masked += [True] * copies
            new_scores += [math.nan] * copies
            continue
        new_hole.append(token)
        new_masked.append(is_masked)
        new_scores.append(scores[position])
    if deletes and family.delete_pads_right:
        end = len(new_hole)  # the hole ends here: no masks left after the delete
        closed_at = end if closed_at is None else min(closed_at, end)
    state.hole = torch.tensor(new_hole, dtype=torch.long)
    state.masked = torch.tensor(new_masked, dtype=torch.bool)
    state.confidences = new_scores
    state.closed_at = closed_at
    state.context = None


def block_finish_reason(model: LoadedModel, state: HoleState) -> str | None:
    """Exact mode of a block-diffusion family (Stable-DiffCoder's `generate_block`): the end
    token is looked for only once a block is full, and only in its generated part; the hole
    then ends at that block's end. None: the block is not full, or it is and the next one
    follows."""
    if bool(state.masked.any()):
        return None
    size = state.options.block_length or state.hole.numel()
    start = max(0, state.block * size - (state.block_offset or 0))  # the block: start..end
    if model.ids.end_of_hole in state.hole[start:].tolist():
        return "end"
    if state.hole.numel() >= state.options.max_tokens:
        return "max_tokens"
    return None


def grow_hole(model: LoadedModel, state: HoleState) -> None:
    """Masks appended to a full hole: `extend_by` of them, or one block (block diffusion)."""
    options = state.options
    step = options.block_length if state.blockwise else options.extend_by
    grow = min(step, options.max_tokens - state.hole.numel())
    state.hole = torch.cat([state.hole, torch.full((grow,), model.ids.mask, dtype=torch.long)])
    state.masked = torch.cat([state.masked, torch.ones(grow, dtype=torch.bool)])


def why_finished(model: LoadedModel, state: HoleState) -> str | None:
    """Why the hole is finished after a step (a finish reason of `Infill`), or None: masks are
    left, or the hole is full of text unfinished (then it grows: `finish_or_grow`)."""
    options = state.options
    if options.exact and state.block_rule is not None and state.block_rule.stop == "full-block":
        return block_finish_reason(model, state)
    text = open_text(model, state)
    if any(stop in text for stop in options.stop):
        return "stop"
    if options.single_line and NEWLINE in text:
        return "newline"
    if text_settled_by_end(model, state):
        return "end"
    if bool(state.masked.any()):
        return None
    if state.closed_at is not None:
        return "end"
    if state.hole.numel() >= options.max_tokens or (options.fixed_length
                                                    and not state.blockwise):
        return "max_tokens"
    if model.ids.expand is not None:  # the model sizes its own hole (DreamOn): it is done
        return "end"
    return None


def finish_or_grow(model: LoadedModel, state: HoleState) -> None:
    """After a step: the hole is finished (`why_finished`), or, with no mask left, grown
    (`grow_hole`)."""
    state.finish_reason = why_finished(model, state)
    if state.finish_reason is None and not bool(state.masked.any()):
        grow_hole(model, state)


def final_text(model: LoadedModel, state: HoleState) -> tuple[str, int]:
    """The hole's text, cut at the first end token, newline (single-line) or stop word; never
    a special or added token (only exact mode can have committed one: it is left out)."""
    real = []
    for token in state.hole.tolist():
        if token == model.ids.mask or is_end(model, token):
            break
        real.append(token)
    if state.options.exact and real:
        real = [t for t, banned in zip(real, model.never_sample[real].tolist(), strict=True)
                if not banned]
    text = model.tokenizer.decode(real, skip_special_tokens=False)
    if state.options.single_line and NEWLINE in text:
        text = text[: text.index(NEWLINE)]
    for stop in state.options.stop:
        if stop in text:
            text = text[: text.index(stop)]
    return text, len(real)


def result(model: LoadedModel, state: HoleState, timings: dict[str, float]) -> Infill:
    text, tokens = final_text(model, state)
    return Infill(text, state.steps, tokens, state.finish_reason or "cancelled", state.trace,
                  timings, state.full_passes, state.guidance_passes,
                  reused_tokens=state.reused_tokens,
                  confidence=text_confidence(state.confidences, tokens) if text else None)
