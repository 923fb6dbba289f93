"""Scoring and selection: which masked positions a step commits, and their tokens.

Every still-masked position gets its best (or sampled) token and a score; the positions that
score above a threshold are committed (at least one per step) -- the confidence-threshold
parallel decoding of Fast-dLLM (Wu et al., 2025), with the low-confidence remasking order of
LLaDA (Nie et al., 2025) -- or a counted number of them under a step budget. No completion
contains a special or added token: their logits are -inf before scoring
(`LoadedModel.never_sample`), except the ones that end or edit the hole.

A greedy step can also be scored where its network ran (`Head`, `step_head`, `greedy_scores`:
`model.decoding.fast_step`'s graph head runs them inside a hole step's CUDA graph); `pick` then
takes the tokens and confidences (`Scored`) instead of logits, and chooses as it would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from diffusion_contract.options import NO_TOP_K, NO_TOP_P, SCORES, InfillOptions
from model.decoding.hole import HoleState, is_end
from model.decoding.pinned import to_device
from model.decoding.schedules import block_span, steps_per_block, transfer_count, transfer_fraction
from model.network.loader import LoadedModel

ENTROPY_EPS = 1e-10  # Dream's neg-entropy confidence: sum p * log(p + eps)


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Dream's nucleus then top-k filters: tokens outside get the dtype's lowest value.

    top_p keeps the smallest set of likeliest tokens whose probabilities add up past top_p
    (the first token always kept); top_k keeps every token at least as likely as the k-th.
    logits: (m, V).
    """
    lowest = torch.finfo(logits.dtype).min
    if top_p < NO_TOP_P:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), lowest)
    if top_k != NO_TOP_K:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]  # (m, 1)
        logits = logits.masked_fill(logits < kth, lowest)
    return logits


def gumbel_tokens(logits: torch.Tensor, temperature: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """LLaDA's sampling: argmax of exp(logits) / (-log u) ** T, in float64 (low precision
    Gumbel-max hurts masked diffusion, arXiv:2409.02908). (m, V) -> (m,)."""
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    return (logits.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)


def raw_scores(probs: torch.Tensor, tokens: torch.Tensor, score: str) -> torch.Tensor:
    """Dream's confidences: p(token), top1 - top2, or sum p log(p + eps) (negative entropy).
    probs (m, V), tokens (m,) -> (m,). These rank, and alg_temp draws from them."""
    if score == "confidence":
        return probs.gather(-1, tokens[:, None]).squeeze(-1)
    if score == "margin":
        top2 = probs.topk(2, dim=-1).values  # (m, 2)
        return top2[:, 0] - top2[:, 1]
    if score == "entropy":
        return (probs * torch.log(probs + ENTROPY_EPS)).sum(-1)
    raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORES)}")


def unit_scores(raw: torch.Tensor, score: str, vocab: int) -> torch.Tensor:
    """Raw confidences mapped into [0, 1] for the threshold (negative entropy / log V + 1)."""
    return 1.0 + raw / math.log(vocab) if score == "entropy" else raw


def sample_and_score(logits: torch.Tensor, score: str, temperature: float,
                     generator: torch.Generator | None, top_p: float = NO_TOP_P,
                     top_k: int = NO_TOP_K,
                     noise: str = "categorical") -> tuple[torch.Tensor, torch.Tensor]:
    """Token and raw confidence (`raw_scores`) for each row. logits: (m, V) -> (m,), (m,).

    categorical (Dream's sample_tokens): logits / T, filtered, softmax; sample (or argmax at
    T = 0) and score from those probabilities. gumbel (LLaDA): Gumbel-max on the filtered
    logits, scored from the untempered softmax.
    """
    logits = logits.float()
    if noise == "gumbel":
        filtered = filter_logits(logits, top_p, top_k)
        probs = torch.softmax(filtered, dim=-1)
        if temperature > 0:
            tokens = gumbel_tokens(filtered, temperature, generator)
        else:
            tokens = filtered.argmax(dim=-1)
        return tokens, raw_scores(probs, tokens, score)
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(filter_logits(logits, top_p, top_k), dim=-1)  # (m, V)
    if temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(dim=-1)
    return tokens, raw_scores(probs, tokens, score)


def score_logits(
    logits: torch.Tensor, score: str, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (or sampled) token and its score in [0, 1] for each row. (m, V) -> (m,), (m,)."""
    tokens, raw = sample_and_score(logits, score, temperature, generator)
    return tokens, unit_scores(raw, score, logits.shape[-1])


class Scored(NamedTuple):
    """A step scored where its logits were: each masked position's token and raw confidence,
    in order, as `sample_and_score` gives them at temperature 0 (`model.decoding.fast_step`'s graph
    head). On the CPU. tokens (m,), raw (m,)."""

    tokens: torch.Tensor
    raw: torch.Tensor
    vocab: int  # the logits' width, for `unit_scores`


def select_commits(scores: torch.Tensor, options: InfillOptions) -> torch.Tensor:
    """Indices (into `scores`) to commit this step: above threshold, or a fixed count; >= 1."""
    if options.tokens_per_step is not None:
        k = min(options.tokens_per_step, scores.numel())
        return scores.topk(k).indices
    chosen = (scores > options.threshold).nonzero().squeeze(-1)
    if chosen.numel() == 0:
        chosen = scores.argmax().reshape(1)
    return chosen


def pick(state: HoleState, logits: torch.Tensor | Scored,
         masked_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pick_spans` of one hole: (indices into `masked_positions`, tokens (m,), confidences
    (m,))."""
    return pick_spans([state], [logits], [masked_positions])[0]


def pick_spans(spans: Sequence[HoleState], logits: Sequence[torch.Tensor | Scored],
               masked: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]]:
    """The one selection rule: which masked positions to commit this step, and their tokens,
    across the spans of one sequence (one hole: one span) -- one threshold, count or draw over
    all of them, with the first span's options, generator and schedule (the spans share them).

    Per span: logits (m, V) are its masked positions' in order (or the step already `Scored`),
    `masked` those positions (m,); only the current block's are candidates. Returns per span
    (indices into its masked positions, tokens (m,), confidences (m,)) -- tokens of
    non-candidates are -1, their confidence NaN; a confidence is the token's score in [0, 1]
    (`unit_scores`: p(token) under the default `confidence` score). Random draws, in this
    order, from the generator: the tokens (temperature), then the positions (origin / random
    / alg_temp).
    """
    state = spans[0]
    options, rule = state.options, state.options.rule
    candidates = []
    for span, positions in zip(spans, masked, strict=True):
        start, end = block_span(span)
        candidates.append(((positions >= start) & (positions < end)).nonzero().squeeze(-1))
    tokens = [torch.full((m.numel(),), -1, dtype=torch.long) for m in masked]
    confidences = [torch.full((m.numel(),), math.nan) for m in masked]
    sizes = [c.numel() for c in candidates]
    if sum(sizes) == 0:
        return list(zip(candidates, tokens, confidences, strict=True))
    if isinstance(logits[0], Scored):
        picked = torch.cat([s.tokens[c] for s, c in zip(logits, candidates, strict=True)])
        raw = torch.cat([s.raw[c] for s, c in zip(logits, candidates, strict=True)])
        vocab = logits[0].vocab
    else:
        rows = (logits[0][candidates[0]] if len(spans) == 1 else  # (M, V)
                torch.cat([x[c] for x, c in zip(logits, candidates, strict=True)]))
        picked, raw = sample_and_score(rows, rule.score, options.temperature, state.generator,
                                       options.top_p, options.top_k, rule.noise)
        if picked.device.type != "cpu":  # scored on the GPU: one copy of (2, M) comes back
            # token ids < 2**24 are exact in float32
            picked, raw = torch.stack([picked.to(raw.dtype), raw]).cpu()
            picked = picked.long()
        vocab = rows.shape[-1]
    scores = unit_scores(raw, rule.score, vocab).float()
    for c, picked_i, scores_i, tokens_i, confidences_i in zip(
            candidates, picked.split(sizes), scores.split(sizes), tokens, confidences,
            strict=True):
        tokens_i[c] = picked_i
        confidences_i[c] = scores_i
    chosen = _choose(state, raw, vocab)  # indices into the spans' candidates, concatenated
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(c[chosen[(chosen >= o) & (chosen < o + n)] - o], t, f)
            for c, o, n, t, f in zip(candidates, offsets, sizes, tokens, confidences,
                                     strict=True)]


def _choose(state: HoleState, raw: torch.Tensor, vocab: int) -> torch.Tensor:
    """`pick_spans`' choice among the candidates with raw scores `raw` (M,): indices (k,)."""
    options, rule, generator = state.options, state.options.rule, state.generator
    if rule.order == "origin":
        steps = steps_per_block(options) or 1
        chance = transfer_fraction(state.block_step, steps)
        draws = torch.rand(raw.numel(), generator=generator)
        return (draws < chance).nonzero().squeeze(-1)
    if rule.order == "random":
        raw = torch.rand(raw.numel(), generator=generator)
    count = transfer_count(state)
    if count is not None and options.threshold_gates_steps:  # the best, and all >= threshold
        scores = unit_scores(raw, rule.score, vocab)
        keep = scores >= options.threshold
        keep[scores.argmax()] = True
        return keep.nonzero().squeeze(-1)
    if count is None:
        return select_commits(unit_scores(raw, rule.score, vocab), options)
    count = min(count, raw.numel())
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    if options.alg_temp > 0:
        weights = torch.softmax(raw / options.alg_temp, dim=-1)
        return torch.multinomial(weights, count, generator=generator)
    return raw.topk(count).indices


def sampleable(model: LoadedModel, state: HoleState, logits: torch.Tensor) -> torch.Tensor:
    """logits (m, V) with every id the hole may not take made impossible: special and added
    tokens (`LoadedModel.never_sample`), and DreamOn's expand once the hole has reached
    `max_tokens` or used its expansion budget (DreamOn eval/generator.py: `logits[:,
    expand_id] -= 1e9` when `cur_generation_window_length == max_tokens or expand_budget ==
    0`; the budget is what stops an expand / delete cycle), and blank space at the first
    position of a `code_start` hole (a marker's hole begins after its line's indentation).

    In place: it runs every step, and filling the k banned columns costs ~400x less than a
    masked copy of the whole (m, V) (0.012 vs 4.7 ms for 16 rows of a 152k vocabulary on one
    CPU core). Inference mode, because forward_holes' logits are inference tensors.

    Exact mode samples as the references do, specials included (their trajectory, token for
    token); `final_text` then leaves the specials out of the text."""
    with torch.inference_mode():
        if not state.options.exact:
            logits.index_fill_(-1, model.never_sample_on(logits.device), float("-inf"))
        if expand_banned(model, state):
            logits[:, model.ids.expand] = float("-inf")
        if state.code_start and bool(state.masked[0]):  # row 0 is the hole's first position
            blank = to_device(model.blank_ids(), logits.device)
            logits[0].index_fill_(-1, blank, float("-inf"))
    return logits


def with_bans(model: LoadedModel, state: HoleState, logits: torch.Tensor | Scored,
              masked_positions: torch.Tensor) -> torch.Tensor | Scored:
    """The logits (m, V) of a hole's masked positions with everything it may not take made
    impossible (`sampleable`, `ban_early_ends`); a step `Scored` where it ran had its bans
    there (`step_head`)."""
    if isinstance(logits, Scored):
        return logits
    logits = sampleable(model, state, logits)
    if bans_early_ends(state.options):
        logits = ban_early_ends(model, logits, masked_positions, state.options)
    return logits


def expand_banned(model: LoadedModel, state: HoleState) -> bool:
    """Whether DreamOn's expand token is out of reach this step (`sampleable`): the hole has
    reached `max_tokens` or used its expansion budget."""
    return model.ids.expand is not None and (state.hole.numel() >= state.options.max_tokens
                                             or state.expansions_left <= 0)


def bans_early_ends(options: InfillOptions) -> bool:
    """Whether `ban_early_ends` applies: a minimum length asked for, outside exact mode (the
    references have no such rule)."""
    return options.min_tokens > 0 and not options.exact


def _ending_ids(model: LoadedModel, single_line: bool) -> list[int]:
    ids = [model.ids.end_of_hole, *model.ids.extra_end]
    if single_line and model.ids.newline is not None:
        ids.append(model.ids.newline)
    return ids


def ban_early_ends(model: LoadedModel, logits: torch.Tensor, masked_positions: torch.Tensor,
                   options: InfillOptions) -> torch.Tensor:
    """logits (m, V) with the tokens that would end the hole (or, single-line, the line)
    made impossible at hole positions before `min_tokens`: an editor asked for text."""
    early = (masked_positions < options.min_tokens).nonzero().squeeze(-1)  # (e,)
    if early.numel() == 0:
        return logits
    logits = logits.clone()
    banned = torch.tensor(_ending_ids(model, options.single_line), dtype=torch.long)
    early, banned = to_device(early, logits.device), to_device(banned, logits.device)
    logits[early[:, None], banned[None, :]] = float("-inf")
    return logits


def with_end_runs(model: LoadedModel, chosen: torch.Tensor, masked_positions: torch.Tensor,
                  tokens: torch.Tensor) -> torch.Tensor:
    """`chosen` plus, for each chosen end token, the start of the run of adjacent masked
    positions before it whose best token is an end too.

    An end at position p means "the hole is at most p tokens long": the model was trained with
    every position after the hole's text padded with end tokens. So the run's first end says
    all the rest. Without this, a model fairly sure of the hole's length but not above the
    threshold commits its ends one per step from the back of the hole (the most certain
    position first): on the bundled preview, 12 of a single-line hole's 13 steps.
    """
    ends = {i for i, token in enumerate(tokens.tolist()) if is_end(model, token)}
    if not ends:
        return chosen
    positions = masked_positions.tolist()
    picked = set(chosen.tolist())
    starts = set()
    for end in picked & ends:
        start = end
        while start - 1 in ends and positions[start - 1] == positions[start] - 1:
            start -= 1
        starts.add(start)
    if starts <= picked:
        return chosen
    return torch.tensor(sorted(picked | starts), dtype=torch.long)


# -- a greedy step scored where its logits are (model.decoding.fast_step's graph head)
# ------------------


class Head(NamedTuple):
    """A greedy step's scoring, fixed for a CUDA graph: the hole's `rows` (window rows 0..rows-1
    predict its positions 0..rows-1), the rule's score, filters and noise, whether the
    never-sampled ids are banned, and the `columns` a step may ban row by row (`step_head`'s
    bans). Equal heads share a captured graph."""

    rows: int
    score: str
    top_p: float
    top_k: int
    noise: str
    never: bool
    columns: tuple[int, ...]


def head_columns(model: LoadedModel) -> tuple[int, ...]:
    """The ids a step may ban for some rows only: the ends, the newline, DreamOn's expand."""
    ids = {model.ids.end_of_hole, *model.ids.extra_end}
    ids.update(i for i in (model.ids.newline, model.ids.expand) if i is not None)
    return tuple(sorted(ids))


def step_head(model: LoadedModel, state: HoleState) -> tuple[Head, torch.Tensor]:
    """The `Head` of `state`'s next greedy step and its bans (rows, columns) bool: per hole
    position, the columns that `sampleable` and `ban_early_ends` would make impossible."""
    options, rule = state.options, state.options.rule
    columns = head_columns(model)
    rows = state.hole.numel()
    bans = torch.zeros((rows, len(columns)), dtype=torch.bool)
    if expand_banned(model, state):
        bans[:, columns.index(model.ids.expand)] = True
    if bans_early_ends(options):
        ends = [columns.index(i) for i in _ending_ids(model, options.single_line)]
        bans[:options.min_tokens, ends] = True
    head = Head(rows, rule.score, options.top_p, options.top_k, rule.noise,
                not options.exact, columns)
    return head, bans


def greedy_scores(logits: torch.Tensor, head: Head, never: torch.Tensor, columns: torch.Tensor,
                  bans: torch.Tensor) -> torch.Tensor:
    """What `apply_step` computes for a greedy step's rows, without a host sync (a CUDA graph
    captures it): the bans (`sampleable`, `ban_early_ends`), then `sample_and_score` at
    temperature 0. logits (rows, V) float, changed in place; never (k,) the never-sampled ids;
    columns (C,) = head.columns; bans (rows, C) bool. Returns (2, rows): tokens (exact in
    float32: ids < 2**24), raw confidences."""
    if head.never:
        logits.index_fill_(-1, never, float("-inf"))
    index = columns[None, :].expand(logits.shape[0], -1)  # (rows, C)
    logits.scatter_(-1, index, logits.gather(-1, index).masked_fill(bans, float("-inf")))
    tokens, raw = sample_and_score(logits, head.score, 0.0, None, head.top_p, head.top_k,
                                   head.noise)
    return torch.stack([tokens.to(raw.dtype), raw])
