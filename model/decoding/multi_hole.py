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
  disappears (Wu et al., 2025, DreamOn), never past `max_tokens`.

Full passes only (no context cache): the holes are spread through the sequence. Scoring and
sampling reuse `model.decoding.sampler`'s functions, so a hole here is scored as a single hole is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffusion_contract.options import InfillOptions
from model.decoding.hole import encode
from model.decoding.preview import expected_steps, hole_preview
from model.decoding.scoring import sample_and_score, select_commits, unit_scores, with_end_runs
from model.network.loader import LoadedModel


@dataclass
class Span:
    """One hole: its tokens (mask id where still masked)."""

    tokens: list[int]
    masked: list[bool]
    closed: bool = False  # a committed end closed it: every later position is end-of-hole

    @property
    def open_masks(self) -> int:
        return sum(self.masked)


@dataclass
class MultiHoleState:
    """Holes between fixed pieces: pieces[i] comes before spans[i]; pieces[-1] after the last."""

    pieces: list[list[int]]  # token ids; bos in the first, eos in the last where the family has
    spans: list[Span]
    options: InfillOptions
    generator: torch.Generator | None = None
    steps: int = 0
    committed: int = 0  # tokens committed by steps, all holes together
    expansions_left: int = 0  # DreamOn's expand budget, shared by the holes
    finish_reason: str | None = None
    blank_ids: torch.Tensor | None = None  # (k,) ids a hole may not start with (code_start)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sequence(self) -> tuple[list[int], list[tuple[int, int, int]]]:
        """(ids, masked) where masked lists (sequence position, span, position in span)."""
        ids: list[int] = []
        where: list[tuple[int, int, int]] = []
        for index, span in enumerate(self.spans):
            ids += self.pieces[index]
            for offset, (token, is_masked) in enumerate(zip(span.tokens, span.masked,
                                                            strict=True)):
                if is_masked:
                    where.append((len(ids), index, offset))
                ids.append(token)
        ids += self.pieces[-1]
        return ids, where


@dataclass
class MultiInfill:
    """The result of filling several holes jointly."""

    texts: list[str]  # one per hole, in order; "" for a hole the model left empty
    steps: int  # forward passes made
    tokens: list[int]  # real tokens per hole
    finish_reason: str  # end | max_tokens | cancelled
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds


_BLANK: dict[int, torch.Tensor] = {}  # id(tokenizer) -> its whitespace-only token ids


def blank_ids(model: LoadedModel) -> torch.Tensor:
    """(k,) ids of tokens that decode to whitespace only (once per tokenizer)."""
    key = id(model.tokenizer)
    if key not in _BLANK:
        vocab = model.tokenizer.get_vocab_size()
        _BLANK[key] = torch.tensor(
            [i for i in range(vocab)
             if not model.tokenizer.decode([i], skip_special_tokens=False).strip()
             and i not in model.ids.ends], dtype=torch.long)
    return _BLANK[key]


def new_multi_state(model: LoadedModel, pieces: Sequence[str], options: InfillOptions,
                    code_start: bool = False) -> MultiHoleState:
    """The state for `len(pieces) - 1` holes, each between two consecutive pieces. With
    `code_start`, no hole starts with blank space (a marker's hole begins after its line's
    indentation: code goes there)."""
    if len(pieces) < 2:
        raise ValueError("several holes need at least two pieces (the text around one hole)")
    family, ids = model.family, model.ids
    encoded = [encode(model, piece) for piece in pieces]
    if (family.always_bos or (family.shifted_logits and not encoded[0])) and ids.bos is not None:
        encoded[0] = [ids.bos, *encoded[0]]
    if ids.eos is not None:
        encoded[-1] = [*encoded[-1], ids.eos]
    if family.shifted_logits and not encoded[0]:
        raise ValueError(f"family {family.name} needs a token before the hole and has no bos")
    dreamon = ids.expand is not None
    length = min(options.initial_tokens, options.max_tokens) if dreamon else options.max_tokens
    spans = [Span([ids.mask] * length, [True] * length) for _ in pieces[1:]]
    return MultiHoleState(encoded, spans, options,
                          generator=torch.Generator().manual_seed(options.seed),
                          expansions_left=options.max_tokens * len(spans) if dreamon else 0,
                          blank_ids=blank_ids(model) if code_start else None)


@torch.inference_mode()
def hole_logits(model: LoadedModel, state: MultiHoleState) -> tuple[torch.Tensor, list]:
    """One full forward pass: logits (m, V) at every still-masked position of every hole, and
    where each is (sequence position, span, position in span)."""
    ids, where = state.sequence()
    shift = 1 if model.family.shifted_logits else 0
    hidden = model.network.model(
        input_ids=torch.tensor([ids], dtype=torch.long, device=model.device),
    ).last_hidden_state[0]  # (L, H)
    rows = torch.tensor([position - shift for position, _, _ in where], dtype=torch.long)
    logits = model.network.lm_head(hidden[rows.to(hidden.device)]).float().cpu()  # (m, V)
    return logits, where


@torch.inference_mode()
def sampleable_rows(model: LoadedModel, state: MultiHoleState, logits: torch.Tensor,
                    where: list) -> torch.Tensor:
    """Special and added tokens made impossible (as `model.decoding.scoring.sampleable`); DreamOn's
    expand too at a hole that reached `max_tokens`, or once the expand budget is spent; and
    the end tokens at each hole's first `min_tokens` positions."""
    logits.index_fill_(-1, model.never_sample_ids, float("-inf"))
    least = state.options.min_tokens
    early = [row for row, (_, _, offset) in enumerate(where) if offset < least]
    if early:  # min_tokens: the first positions of every hole may not end it
        ends = torch.tensor(sorted(model.ids.ends), dtype=torch.long)
        logits[torch.tensor(early)[:, None], ends[None, :]] = float("-inf")
    first = [row for row, (_, _, offset) in enumerate(where) if offset == 0]
    if first and state.blank_ids is not None and state.blank_ids.numel():
        logits[torch.tensor(first)[:, None], state.blank_ids[None, :]] = float("-inf")
    expand = model.ids.expand
    if expand is not None:
        full = [len(span.tokens) >= state.options.max_tokens or state.expansions_left <= 0
                for span in state.spans]
        rows = [row for row, (_, index, _) in enumerate(where) if full[index]]
        if rows:
            logits[torch.tensor(rows), expand] = float("-inf")
    return logits


def _close(model: LoadedModel, span: Span, offset: int) -> None:
    """Masks from `offset` on become end-of-hole: this hole ends there."""
    for position in range(offset, len(span.tokens)):
        if span.masked[position]:
            span.tokens[position] = model.ids.end_of_hole
            span.masked[position] = False
    span.closed = True


def _edit(model: LoadedModel, state: MultiHoleState, span: Span) -> None:
    """DreamOn's length edits in one hole (`model.decoding.hole.edit_hole`, per span): a committed
    expand becomes two masks (while the hole is under max_tokens and the budget lasts), a
    committed delete disappears, and with `delete_pads_right` so do the masks after it."""
    ids, family = model.ids, model.family
    deletes = [p for p, t in enumerate(span.tokens) if not span.masked[p] and t == ids.delete]
    drop = set(deletes)
    if deletes and family.delete_pads_right:
        drop |= {p for p in range(deletes[0], len(span.tokens)) if span.masked[p]}
    tokens, masked = [], []
    room = state.options.max_tokens - (len(span.tokens) - len(drop))
    for position, (token, is_masked) in enumerate(zip(span.tokens, span.masked, strict=True)):
        if position in drop:
            continue
        if not is_masked and token == ids.expand:
            copies = 2 if room > 0 and state.expansions_left > 0 else 1
            room -= copies - 1
            state.expansions_left -= copies - 1
            tokens += [ids.mask] * copies
            masked += [True] * copies
            continue
        tokens.append(token)
        masked.append(is_masked)
    span.tokens, span.masked = tokens, masked
    if deletes and family.delete_pads_right:
        span.closed = True


def multi_step(model: LoadedModel, state: MultiHoleState, logits: torch.Tensor,
               where: list) -> None:
    """Commit tokens across all holes from one forward pass (logits (m, V), `where` as
    `hole_logits` gives them): the threshold (or a fixed count) over every masked position."""
    options = state.options
    logits = sampleable_rows(model, state, logits, where)
    tokens, raw = sample_and_score(logits, options.score, options.temperature, state.generator,
                                   options.top_p, options.top_k)
    chosen = select_commits(unit_scores(raw, options.score, logits.shape[-1]), options)
    if options.end_runs:
        # positions spread out per hole, so that an end run never reaches into another hole
        spread = torch.tensor([position + 2 * index for position, index, _ in where])
        chosen = with_end_runs(model, chosen, spread, tokens)
    state.steps += 1
    state.committed += chosen.numel()
    touched = set()
    for row in sorted(chosen.tolist()):
        _, index, offset = where[row]
        span = state.spans[index]
        if not span.masked[offset]:  # closed by an earlier end this step
            continue
        token = int(tokens[row])
        span.tokens[offset], span.masked[offset] = token, False
        touched.add(index)
        if token in model.ids.ends:
            _close(model, span, offset + 1)
    for index in touched:
        span = state.spans[index]
        if any(not m and t in model.ids.hole_edits for t, m in zip(span.tokens, span.masked,
                                                                   strict=True)):
            _edit(model, state, span)
    if not any(span.open_masks for span in state.spans):
        full = any(not span.closed and len(span.tokens) >= options.max_tokens
                   for span in state.spans)
        state.finish_reason = "max_tokens" if full else "end"


def hole_texts(model: LoadedModel, state: MultiHoleState) -> tuple[list[str], list[int]]:
    """Each hole's text (up to its first end or mask) and its count of real tokens."""
    texts, counts = [], []
    for span in state.spans:
        real = []
        for token, is_masked in zip(span.tokens, span.masked, strict=True):
            if is_masked or token in model.ids.ends:
                break
            real.append(token)
        texts.append(model.tokenizer.decode(real, skip_special_tokens=False))
        counts.append(len(real))
    return texts, counts


def multi_preview(model: LoadedModel, state: MultiHoleState) -> tuple[int, int, list[str]]:
    """(step, expected steps, each hole as it stands) -- `model.decoding.preview` for several
    holes."""
    texts = [hole_preview(model, span.tokens, span.masked) for span in state.spans]
    masked = sum(span.open_masks for span in state.spans)
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
        logits, where = hole_logits(model, state)
        forward_s += time.perf_counter() - before
        multi_step(model, state, logits, where)
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
