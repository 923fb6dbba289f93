"""Masked-diffusion infilling: fill a hole between a prefix and a suffix in a few parallel steps.

The hole starts as `n` mask tokens. Each step is one forward pass over prefix + hole + suffix;
every still-masked position gets its best token and a score, and the positions that score
above a threshold are committed (at least one per step) -- the confidence-threshold parallel
decoding of Fast-dLLM (Wu et al., 2025), with the low-confidence remasking order of LLaDA
(Nie et al., 2025). A committed token never changes.

Variable length: a position decoding to the family's end-of-hole token (or pad token) closes
the hole there (every later position becomes end-of-hole too). A hole that fills with real
tokens before it is finished is extended by a fixed `extend_by` masks, up to `max_tokens`. For
DreamOn (Wu et al., 2025), whose model predicts its own edits, a committed <|expand|> becomes
two masks and a committed <|delete|> disappears (`edit_hole`).

No completion contains a special or added token: their logits are -inf before scoring
(`LoadedModel.never_sample`), except the ones that end or edit the hole.

The functions below are pure over a `HoleState`; `forward_holes` runs the network for any
number of states at once, so the single-request loop (`infill`) and the engine's batched loop
share one step function (`apply_step`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from model.loader import LoadedModel

# transformers 5.x renames the forward's `past_key_values` to `cache` (removed in 5.40) and warns
# on every model load; every 5.x takes the old name, which the forward calls below pass
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated",
                        category=FutureWarning)

if TYPE_CHECKING:
    from model.prompt_cache import PromptCache, Reuse

SCORES = ("confidence", "margin", "entropy")
NEWLINE = "\n"
DREAM_EPS = 1e-3  # Dream's timestep schedule ends at eps, not 0 (generation_utils.py default)
ENTROPY_EPS = 1e-10  # Dream's neg-entropy confidence: sum p * log(p + eps)
NO_TOP_K = 0
NO_TOP_P = 1.0


@dataclass(frozen=True)
class Rule:
    """What a reference sampler's algorithm name means in this sampler's terms.

    score: which score ranks masked positions (confidence | margin | entropy).
    order: "score" (the best-scored positions are committed), "random" (LLaDA's random
      remasking: uniformly random scores), "origin" (Dream's: each masked position is
      committed with probability 1 - s/t this step, whatever its score).
    schedule: how many positions a `steps` budget commits per step: "timesteps" (Dream:
      int(masks * (1 - s/t)) over linspace(1, eps, steps + 1), all at the last step) or
      "uniform" (LLaDA's get_num_transfer_tokens: a block's masks spread evenly, the
      remainder on the first steps).
    noise: how temperature samples a token: "categorical" (Dream: softmax(logits / T) after
      top_p / top_k; the score is read off those probabilities) or "gumbel" (LLaDA: argmax of
      exp(logits) / (-log u) ** T in float64; the score is read off softmax(logits)).
    """

    score: str
    order: str
    schedule: str
    noise: str


# Reference names (Dream's `alg`, LLaDA's `remasking`) -> this sampler's rule.
ALGORITHMS: dict[str, Rule] = {
    "maskgit_plus": Rule("confidence", "score", "timesteps", "categorical"),
    "topk_margin": Rule("margin", "score", "timesteps", "categorical"),
    "entropy": Rule("entropy", "score", "timesteps", "categorical"),
    "origin": Rule("confidence", "origin", "timesteps", "categorical"),
    "low_confidence": Rule("confidence", "score", "uniform", "gumbel"),
    "random": Rule("confidence", "random", "uniform", "gumbel"),
}


@dataclass(frozen=True)
class InfillOptions:
    """How to fill one hole. Defaults: deterministic, a few tokens per step."""

    max_tokens: int = 64  # the hole never grows past this many tokens
    initial_tokens: int = 16  # first guess of the hole's length
    extend_by: int = 8  # masks appended when the hole fills with real tokens unfinished
    threshold: float = 0.9  # commit every masked position scoring above this (>= 1: one a step)
    tokens_per_step: int | None = None  # commit exactly this many per step instead
    score: str = "confidence"  # confidence | margin | entropy (all in [0, 1])
    temperature: float = 0.0  # 0: argmax (deterministic)
    seed: int = 0  # for temperature > 0
    single_line: bool = False  # stop at the end of the line
    stop: tuple[str, ...] = ()  # stop words: the text ends before the first one
    reuse_context: bool = True  # cache prefix/suffix keys and values; later steps run the hole only
    refresh_every: int = 4  # with reuse_context: full pass every this many steps (0: never)
    min_tokens: int = 0  # the first this many hole positions may not end the hole (or line)
    end_runs: bool = True  # a committed end also commits the run of predicted ends before it
    # -- reference samplers (Dream, LLaDA); see `Rule` and the README's settings table --------
    algorithm: str | None = None  # a reference name (ALGORITHMS); None: `score` + threshold
    steps: int | None = None  # a step budget: the hole is max_tokens long, filled on a schedule
    block_length: int | None = None  # LLaDA's semi-autoregressive blocks, left to right
    top_p: float = NO_TOP_P  # nucleus filter before sampling (1: off)
    top_k: int = NO_TOP_K  # keep the k likeliest tokens before sampling (0: off)
    alg_temp: float = 0.0  # Dream: > 0 draws positions from softmax(score / alg_temp)
    cfg_scale: float = 0.0  # LLaDA: > 0 adds a pass with prefix and suffix masked (guidance)
    exact: bool = False  # the published algorithm verbatim: full passes, fixed-length hole,
    # no end closing, end runs or min_tokens

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; known: {', '.join(SCORES)}")
        if self.algorithm is not None and self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; "
                             f"known: {', '.join(ALGORITHMS)}")
        self._check_reference_settings()
        if self.max_tokens < 1 or self.initial_tokens < 1:
            raise ValueError("max_tokens and initial_tokens must be at least 1")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise ValueError("tokens_per_step must be at least 1")
        if self.refresh_every < 0:
            raise ValueError("refresh_every must be 0 (never) or positive")

    def _check_reference_settings(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be at least 1")
        if self.steps is not None and self.tokens_per_step is not None:
            raise ValueError("set steps or tokens_per_step, not both")
        if self.block_length is not None:
            if self.block_length < 1:
                raise ValueError("block_length must be at least 1")
            if self.steps is not None:
                if self.max_tokens % self.block_length:
                    raise ValueError("with steps, max_tokens must be a multiple of block_length "
                                     "(LLaDA: gen_length % block_length == 0)")
                if self.steps % (self.max_tokens // self.block_length):
                    raise ValueError("with block_length, steps must be a multiple of the number "
                                     "of blocks (LLaDA: steps % num_blocks == 0)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.alg_temp < 0 or self.cfg_scale < 0 or self.temperature < 0:
            raise ValueError("top_k, alg_temp, cfg_scale and temperature must not be negative")
        order = self.rule.order
        if order == "origin" and self.steps is None:
            raise ValueError("algorithm 'origin' needs steps (it commits with probability 1 - s/t)")
        counted = self.steps is not None or self.tokens_per_step is not None
        if (order == "random" or self.alg_temp > 0) and not counted:
            raise ValueError("random orders and alg_temp need steps or tokens_per_step "
                             "(a count of positions to draw)")

    @property
    def rule(self) -> Rule:
        """The reference rule in force: the named algorithm's, or the project's own."""
        if self.algorithm is not None:
            return ALGORITHMS[self.algorithm]
        return Rule(self.score, "score", "timesteps", "categorical")

    @property
    def fixed_length(self) -> bool:
        """The references fill a hole of a set length (max_new_tokens / gen_length): with a step
        budget or in exact mode the hole is `max_tokens` long and never grows."""
        return self.exact or self.steps is not None

    @property
    def first_length(self) -> int:
        return self.max_tokens if self.fixed_length else min(self.initial_tokens, self.max_tokens)

    @property
    def caches_context(self) -> bool:
        """Whether hole-only passes against cached context keys/values may run (the dual cache
        is an approximation; exact mode and classifier-free guidance run full passes)."""
        return self.reuse_context and not self.exact and self.cfg_scale == 0


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


@dataclass
class ContextCache:
    """Keys and values of every position outside the hole's window, from the last full pass.

    Approximate: they were computed when the hole held what it held then (the dual cache of
    Fast-dLLM, Wu et al., 2025); `refresh_every` bounds how stale they get.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, heads, L - w, head_dim)
    hole_len: int  # the hole's length when cached: growing the hole invalidates the cache
    age: int = 0  # cached steps run since the full pass


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
    reuse: Reuse | None = None  # the document's cached context rows, for the first pass
    reused_tokens: int = 0

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


# ---------------------------------------------------------------------------------------------
# Layout


def encode(model: LoadedModel, text: str) -> list[int]:
    return model.tokenizer.encode(text, add_special_tokens=False).ids if text else []


def layout_ids(model: LoadedModel, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the hole, with the family's bos/eos around them."""
    family, ids = model.family, model.ids
    prefix_ids = encode(model, prefix)
    suffix_ids = encode(model, suffix)
    needs_bos = family.always_bos or (family.shifted_logits and not prefix_ids)
    if needs_bos and ids.bos is not None:
        prefix_ids = [ids.bos, *prefix_ids]
    if ids.eos is not None:
        suffix_ids = [*suffix_ids, ids.eos]
    if family.shifted_logits and not prefix_ids:
        raise ValueError(f"family {family.name} needs a token before the hole and has no bos")
    return prefix_ids, suffix_ids


def new_state(model: LoadedModel, prefix: str, suffix: str, options: InfillOptions) -> HoleState:
    prefix_ids, suffix_ids = layout_ids(model, prefix, suffix)
    n = options.first_length
    state = HoleState(
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        hole=torch.full((n,), model.ids.mask, dtype=torch.long),
        masked=torch.ones(n, dtype=torch.bool),
        options=options,
        generator=torch.Generator().manual_seed(options.seed),
        expansions_left=options.max_tokens if model.ids.expand is not None else 0,
    )
    advance_schedule(state)
    return state


# ---------------------------------------------------------------------------------------------
# Scoring and selection


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


def select_commits(scores: torch.Tensor, options: InfillOptions) -> torch.Tensor:
    """Indices (into `scores`) to commit this step: above threshold, or a fixed count; >= 1."""
    if options.tokens_per_step is not None:
        k = min(options.tokens_per_step, scores.numel())
        return scores.topk(k).indices
    chosen = (scores > options.threshold).nonzero().squeeze(-1)
    if chosen.numel() == 0:
        chosen = scores.argmax().reshape(1)
    return chosen


# ---------------------------------------------------------------------------------------------
# Step budgets and blocks (Dream's timestep schedule, LLaDA's semi-autoregressive blocks)


def timesteps(steps: int) -> torch.Tensor:
    """Dream's schedule: (steps + 1,) times from 1 down to eps, float32 as in the reference."""
    return torch.linspace(1, DREAM_EPS, steps + 1)


def transfer_fraction(step: int, steps: int) -> torch.Tensor:
    """1 - s/t at schedule step `step` of `steps`: the share of the masks committed now
    (Dream: the expected share unmasked between times t and s); 1 at the last step."""
    if step >= steps - 1:
        return torch.tensor(1.0)
    times = timesteps(steps)
    return 1 - times[step + 1] / times[step]


def uniform_counts(masks: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens: `masks` spread over `steps`, the remainder first."""
    base, remainder = divmod(masks, steps)
    return [base + (1 if step < remainder else 0) for step in range(steps)]


def steps_per_block(options: InfillOptions) -> int | None:
    """LLaDA divides the step budget evenly between the blocks."""
    if options.steps is None:
        return None
    blocks = options.max_tokens // options.block_length if options.block_length else 1
    return options.steps // blocks


def block_span(state: HoleState) -> tuple[int, int]:
    """[start, end) hole positions of the block being decoded (the whole hole without blocks)."""
    size = state.options.block_length or state.hole.numel()
    start = state.block * size
    return start, min(start + size, state.hole.numel())


def _block_masks(state: HoleState) -> int:
    start, end = block_span(state)
    return int(state.masked[start:end].sum())


def transfer_count(state: HoleState) -> int | None:
    """How many positions this step commits: from the step budget's schedule, or
    tokens_per_step; None when the threshold decides (and for Dream's origin order)."""
    options = state.options
    rule = options.rule
    if rule.order == "origin":
        return None
    steps = steps_per_block(options)
    if steps is None:
        return options.tokens_per_step
    masks = _block_masks(state)
    if state.block_step >= steps - 1:
        return masks
    if rule.schedule == "uniform":
        return uniform_counts(state.block_masks, steps)[state.block_step]
    fraction = transfer_fraction(state.block_step, steps)
    return int(torch.tensor(float(masks)) * fraction)  # float32, as Dream's int(n * (1 - s/t))


def advance_schedule(state: HoleState) -> None:
    """Before a forward pass: move on to the first block that still has masks, and past the
    schedule steps that would commit nothing. Such a step's forward pass could change nothing
    (nothing is committed), so it is not run; the schedule's step count still advances."""
    while block_span(state)[0] < state.hole.numel() and _block_masks(state) == 0:
        state.block, state.block_step, state.block_masks = state.block + 1, 0, -1
    if block_span(state)[0] >= state.hole.numel():
        return
    if state.block_masks < 0:
        state.block_masks = _block_masks(state)
    steps = steps_per_block(state.options)
    while steps is not None and state.block_step < steps - 1 and transfer_count(state) == 0:
        state.block_step += 1


def pick(state: HoleState, logits: torch.Tensor,
         masked_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one selection rule: which masked positions to commit this step, and their tokens.

    logits (m, V) are the masked positions' in order; only the current block's are candidates.
    Returns (indices into `masked_positions`, tokens (m,)) -- tokens of non-candidates are -1.
    Random draws, in this order, from the state's generator: the tokens (temperature), then
    the positions (origin / random / alg_temp).
    """
    options, rule = state.options, state.options.rule
    start, end = block_span(state)
    candidates = ((masked_positions >= start) & (masked_positions < end)).nonzero().squeeze(-1)
    tokens = torch.full((masked_positions.numel(),), -1, dtype=torch.long)
    if candidates.numel() == 0:
        return candidates, tokens
    picked, raw = sample_and_score(logits[candidates], rule.score, options.temperature,
                                   state.generator, options.top_p, options.top_k, rule.noise)
    tokens[candidates] = picked
    generator = state.generator
    if rule.order == "origin":
        steps = steps_per_block(options) or 1
        chance = transfer_fraction(state.block_step, steps)
        draws = torch.rand(candidates.numel(), generator=generator)
        return candidates[(draws < chance).nonzero().squeeze(-1)], tokens
    if rule.order == "random":
        raw = torch.rand(candidates.numel(), generator=generator)
    count = transfer_count(state)
    if count is None:
        chosen = select_commits(unit_scores(raw, rule.score, logits.shape[-1]), options)
    else:
        count = min(count, candidates.numel())
        if count == 0:
            chosen = candidates[:0]
        elif options.alg_temp > 0:
            weights = torch.softmax(raw / options.alg_temp, dim=-1)
            chosen = torch.multinomial(weights, count, generator=generator)
        else:
            chosen = raw.topk(count).indices
    return candidates[chosen], tokens


# ---------------------------------------------------------------------------------------------
# One step


def logit_positions(state: HoleState, shifted: bool) -> torch.Tensor:
    """Sequence positions whose logits predict the still-masked hole tokens. (m,)"""
    positions = state.masked.nonzero().squeeze(-1) + state.hole_start
    return positions - 1 if shifted else positions


def _is_end(model: LoadedModel, token: int) -> bool:
    return token == model.ids.end_of_hole or token in model.ids.extra_end


def sampleable(model: LoadedModel, state: HoleState, logits: torch.Tensor) -> torch.Tensor:
    """logits (m, V) with every id the hole may not take made impossible: special and added
    tokens (`LoadedModel.never_sample`), and DreamOn's expand once the hole has reached
    `max_tokens` or used its expansion budget (DreamOn eval/generator.py: `logits[:,
    expand_id] -= 1e9` when `cur_generation_window_length == max_tokens or expand_budget ==
    0`; the budget is what stops an expand / delete cycle).

    In place: it runs every step, and filling the k banned columns costs ~400x less than a
    masked copy of the whole (m, V) (0.012 vs 4.7 ms for 16 rows of a 152k vocabulary on one
    CPU core). Inference mode, because forward_holes' logits are inference tensors.

    Exact mode samples as the references do, specials included (their trajectory, token for
    token); `final_text` then leaves the specials out of the text."""
    expand = model.ids.expand
    full = state.hole.numel() >= state.options.max_tokens
    with torch.inference_mode():
        if not state.options.exact:
            logits.index_fill_(-1, model.never_sample_ids, float("-inf"))
        if expand is not None and (full or state.expansions_left <= 0):
            logits[:, expand] = float("-inf")
    return logits


def _close(state: HoleState, model: LoadedModel, position: int) -> None:
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
        if masked or _is_end(model, token):
            break
        run.append(token)
    return model.tokenizer.decode(run, skip_special_tokens=False)


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
    is_end = {i for i, token in enumerate(tokens.tolist()) if _is_end(model, token)}
    if not is_end:
        return chosen
    positions = masked_positions.tolist()
    picked = set(chosen.tolist())
    starts = set()
    for end in picked & is_end:
        start = end
        while start - 1 in is_end and positions[start - 1] == positions[start] - 1:
            start -= 1
        starts.add(start)
    if starts <= picked:
        return chosen
    return torch.tensor(sorted(picked | starts), dtype=torch.long)


def apply_step(model: LoadedModel, state: HoleState, logits: torch.Tensor) -> None:
    """Commit tokens from one forward pass. logits: (m, V) for the m masked positions, in order
    (consumed: ids that may not be sampled are set to -inf in place)."""
    options = state.options
    masked_positions = state.masked.nonzero().squeeze(-1)  # (m,)
    logits = sampleable(model, state, logits)
    if options.min_tokens > 0 and not options.exact:  # the references have no such rule
        logits = ban_early_ends(model, logits, masked_positions, options)
    chosen, tokens = pick(state, logits, masked_positions)
    if options.end_runs and not options.exact:
        chosen = with_end_runs(model, chosen, masked_positions, tokens)
    committed = []
    for index in chosen.tolist():
        position, token = int(masked_positions[index]), int(tokens[index])
        state.hole[position] = token
        state.masked[position] = False
        committed.append((position, token))
    state.steps += 1
    for position, token in sorted(committed):
        if options.exact:  # the references leave later masks to the schedule
            break
        if state.closed_at is not None and position >= state.closed_at:
            continue
        ends_line = options.single_line and NEWLINE in model.tokenizer.decode([token])
        if _is_end(model, token) or ends_line:
            _close(state, model, position + 1)
    edits = sorted((p, t) for p, t in committed if t in model.ids.hole_edits)
    if edits:
        edit_hole(model, state, edits)
    state.trace.append(StepTrace(committed, state.hole.tolist()))
    _check_finished(model, state)
    if options.steps is not None:
        state.block_step += 1
    advance_schedule(state)


def text_settled_by_end(model: LoadedModel, state: HoleState) -> bool:
    """The committed run at the hole's start ends at a committed end token: the text can no
    longer change, whatever the positions after it become (exact mode stops here; the
    references would go on decoding positions that the text never reads)."""
    for token, masked in zip(state.hole.tolist(), state.masked.tolist(), strict=True):
        if masked:
            return False
        if _is_end(model, token):
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
    new_hole, new_masked, closed_at = [], [], state.closed_at
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
            continue
        new_hole.append(token)
        new_masked.append(is_masked)
    if deletes and family.delete_pads_right:
        end = len(new_hole)  # the hole ends here: no masks left after the delete
        closed_at = end if closed_at is None else min(closed_at, end)
    state.hole = torch.tensor(new_hole, dtype=torch.long)
    state.masked = torch.tensor(new_masked, dtype=torch.bool)
    state.closed_at = closed_at
    state.context = None


def _check_finished(model: LoadedModel, state: HoleState) -> None:
    options = state.options
    text = open_text(model, state)
    if any(stop in text for stop in options.stop):
        state.finish_reason = "stop"
        return
    if options.single_line and NEWLINE in text:
        state.finish_reason = "newline"
        return
    if text_settled_by_end(model, state):
        state.finish_reason = "end"
        return
    if bool(state.masked.any()):
        return
    if state.closed_at is not None:
        state.finish_reason = "end"
        return
    if state.hole.numel() >= options.max_tokens or options.fixed_length:
        state.finish_reason = "max_tokens"
        return
    if model.ids.expand is not None:  # the model sizes its own hole (DreamOn): it is done
        state.finish_reason = "end"
        return
    grow = min(options.extend_by, options.max_tokens - state.hole.numel())
    state.hole = torch.cat([state.hole, torch.full((grow,), model.ids.mask, dtype=torch.long)])
    state.masked = torch.cat([state.masked, torch.ones(grow, dtype=torch.bool)])


def final_text(model: LoadedModel, state: HoleState) -> tuple[str, int]:
    """The hole's text, cut at the first end token, newline (single-line) or stop word; never
    a special or added token (only exact mode can have committed one: it is left out)."""
    real = []
    for token in state.hole.tolist():
        if token == model.ids.mask or _is_end(model, token):
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
                  reused_tokens=state.reused_tokens)


# ---------------------------------------------------------------------------------------------
# Forward pass over any number of holes


def window(state: HoleState, shifted: bool) -> tuple[int, int]:
    """[start, end) of the positions a hole-only pass must run: the hole, plus the token
    before it when logits are shifted (its output predicts the hole's first token)."""
    start = state.hole_start - (1 if shifted else 0)
    return start, state.hole_start + state.hole.numel()


def needs_full_pass(state: HoleState) -> bool:
    options, context = state.options, state.context
    if not options.caches_context or context is None:
        return True
    if context.hole_len != state.hole.numel():
        return True
    return options.refresh_every > 0 and context.age + 1 >= options.refresh_every


def _rows_at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return hidden[positions.to(hidden.device)]


@torch.inference_mode()
def _full_pass(model: LoadedModel, states: Sequence[HoleState]) -> list[torch.Tensor]:
    """Whole sequences, batched: right-padded, padding masked out of attention, so a hole's
    hidden states do not depend on what it is batched with. Returns (m_i, H) per state and,
    when asked, keeps each state's context keys/values for hole-only passes."""
    sequences = [s.sequence() for s in states]
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    input_ids = torch.full((len(states), width), model.ids.pad, dtype=torch.long)
    attention = torch.zeros((len(states), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
    padded = any(length != width for length in lengths)
    keep_cache = any(s.options.caches_context for s in states)
    cache = DynamicCache() if keep_cache else None
    hidden = model.network.model(
        input_ids=input_ids.to(model.device),
        attention_mask=attention.to(model.device) if padded else None,
        past_key_values=cache,
        use_cache=keep_cache,
    ).last_hidden_state  # (B, L, H)
    shifted = model.family.shifted_logits
    rows = []
    for row, state in enumerate(states):
        rows.append(_rows_at(hidden[row], logit_positions(state, shifted)))
        state.full_passes += 1
        if state.options.caches_context:
            start, end = window(state, shifted)
            length = lengths[row]
            state.context = ContextCache(
                [
                    (_outside(layer.keys[row : row + 1], start, end, length),
                     _outside(layer.values[row : row + 1], start, end, length))
                    for layer in cache.layers
                ],
                hole_len=state.hole.numel(),
            )
    return rows


def _outside(tensor: torch.Tensor, start: int, end: int, length: int) -> torch.Tensor:
    """(1, heads, W, D) -> (1, heads, length - (end - start), D): drop the window and padding."""
    return torch.cat([tensor[..., :start, :], tensor[..., end:length, :]], dim=-2)


@torch.inference_mode()
def _hole_pass(model: LoadedModel, states: Sequence[HoleState]) -> list[torch.Tensor]:
    """Run only each hole's window against its cached context, batched. Returns (m_i, H).

    Contexts and windows of different lengths are right-padded; a 4D mask hides the padding
    from every query, so a hole's result does not depend on its batch.
    """
    shifted = model.family.shifted_logits
    windows = [window(s, shifted) for s in states]
    widths = [end - start for start, end in windows]
    contexts = [s.context.layers[0][0].shape[-2] for s in states]
    width, context = max(widths), max(contexts)
    batch = len(states)
    ids = torch.full((batch, width), model.ids.pad, dtype=torch.long)
    positions = torch.zeros((batch, width), dtype=torch.long)
    visible = torch.zeros((batch, context + width), dtype=torch.bool)  # keys each row may see
    for row, (state, (start, end)) in enumerate(zip(states, windows, strict=True)):
        ids[row, : end - start] = state.sequence()[start:end]
        positions[row, : end - start] = torch.arange(start, end)  # real positions, for RoPE
        visible[row, : contexts[row]] = True
        visible[row, context : context + end - start] = True
    layers = []
    for index in range(len(states[0].context.layers)):
        keys, values = [], []
        for row, state in enumerate(states):
            k, v = state.context.layers[index]
            pad = context - contexts[row]
            keys.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            values.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
        layers.append((torch.cat(keys), torch.cat(values)))  # (B, heads, C, D)
    padded = batch > 1 and (len(set(widths)) > 1 or len(set(contexts)) > 1)
    mask = visible[:, None, None, :].expand(batch, 1, width, context + width) if padded else None
    hidden = model.network.model(
        input_ids=ids.to(model.device),
        position_ids=positions.to(model.device),
        past_key_values=DynamicCache(ddp_cache_data=layers),
        attention_mask=mask.to(model.device) if mask is not None else None,
        use_cache=True,
    ).last_hidden_state  # (B, W, H)
    rows = []
    for row, (state, (start, _)) in enumerate(zip(states, windows, strict=True)):
        state.context.age += 1
        rows.append(_rows_at(hidden[row], logit_positions(state, shifted) - start))
    return rows


@torch.inference_mode()
def forward_holes(model: LoadedModel, states: Sequence[HoleState]) -> list[torch.Tensor]:
    """One denoising forward pass for any number of holes: logits at each state's masked
    positions, as a list of (m_i, V) float tensors.

    States whose context cache is fresh run their hole only; the rest share one batched
    pass over their whole sequences (which also refreshes their caches).
    """
    full = [i for i, s in enumerate(states) if needs_full_pass(s)]
    guided = [i for i, s in enumerate(states) if s.options.cfg_scale > 0]
    twins = [unconditioned(model, states[i]) for i in guided]
    hidden: dict[int, torch.Tensor] = {}
    for i in full:  # a first pass that reuses its document's context (model.prompt_cache)
        if states[i].reuse is not None and states[i].context is None:
            hidden[i] = states[i].reuse.run(model, states[i])
    full = [i for i in full if i not in hidden]
    if full:
        passed = _full_pass(model, [states[i] for i in full] + twins)
        hidden.update(zip(full, passed[: len(full)], strict=True))
        hidden.update(zip([-1 - i for i in guided], passed[len(full):], strict=True))
    cached = [i for i in range(len(states)) if i not in hidden]
    if cached:
        hidden.update(zip(cached, _hole_pass(model, [states[i] for i in cached]), strict=True))
    order = list(range(len(states))) + [-1 - i for i in guided]
    rows = torch.cat([hidden[i] for i in order])  # (M, H)
    logits = model.network.lm_head(rows).float().cpu()  # (M, V)
    split = dict(zip(order, logits.split([hidden[i].shape[0] for i in order]), strict=True))
    for i in guided:
        states[i].guidance_passes += 1
        split[i] = guide(split[i], split[-1 - i], states[i].options.cfg_scale)
    return [split[i] for i in range(len(states))]


def unconditioned(model: LoadedModel, state: HoleState) -> HoleState:
    """The state with its prompt (every prefix and suffix token) masked, as LLaDA's
    unsupervised classifier-free guidance runs it; same hole, no cache."""
    mask = model.ids.mask
    return HoleState(
        prefix_ids=[mask] * len(state.prefix_ids),
        suffix_ids=[mask] * len(state.suffix_ids),
        hole=state.hole,
        masked=state.masked,
        options=state.options,
    )


def guide(conditioned: torch.Tensor, unconditioned: torch.Tensor, scale: float) -> torch.Tensor:
    """LLaDA's guidance: un + (scale + 1) * (cond - un). (m, V) each."""
    return unconditioned + (scale + 1) * (conditioned - unconditioned)


# ---------------------------------------------------------------------------------------------
# The single-request loop


def infill(
    model: LoadedModel,
    prefix: str,
    suffix: str,
    options: InfillOptions | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache: PromptCache | None = None,
    document: str | None = None,
    on_step: Callable[[HoleState], None] | None = None,
) -> Infill:
    """Fill the hole between `prefix` and `suffix`. `should_stop` is polled before each step.
    With a `cache` and a `document` key, the first pass reuses the document's context from its
    last completion, and this completion's context is kept for the next. `on_step` sees the
    state after every step but the last (a live preview: `model.preview`)."""
    options = options or InfillOptions()
    started = time.perf_counter()
    state = new_state(model, prefix, suffix, options)
    if cache is not None:
        cache.attach(model, document, state)
    tokenized = time.perf_counter()
    forward_s = 0.0
    while not state.finished:
        if should_stop is not None and should_stop():
            break
        before = time.perf_counter()
        (logits,) = forward_holes(model, [state])
        forward_s += time.perf_counter() - before
        apply_step(model, state, logits)
        if cache is not None and document is not None and state.steps == 1:
            cache.store(model, document, state)
        if on_step is not None and not state.finished:
            on_step(state)
    timings = {
        "tokenize_ms": (tokenized - started) * 1e3,
        "forward_ms": forward_s * 1e3,
        "total_ms": (time.perf_counter() - started) * 1e3,
    }
    return result(model, state, timings)
