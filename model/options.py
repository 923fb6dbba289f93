"""How to fill one hole: `InfillOptions`, and the reference samplers' rules it can follow.

Torch-free: the language server, the service's wire format and the command line read the
names, defaults and validation from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCORES = ("confidence", "margin", "entropy")


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


INITIAL_TOKENS = 16  # a hole's first guessed length, as editors and the service ask
MIN_TOKENS = 1  # whoever asks for a completion wants some text


def hole_options(max_tokens: int, *, threshold: float | None = None,
                 tokens_per_step: int | None = None, single_line: bool = False,
                 stop: tuple[str, ...] = (), min_tokens: int = MIN_TOKENS,
                 **sampler: Any) -> InfillOptions:
    """The options a hole is filled with when an editor (the language server's local backend,
    its next edits) or a client of the service asks: the sampler's defaults but for these, a
    first guess of INITIAL_TOKENS, at least `min_tokens` real tokens; `sampler`: the
    reference samplers' settings (algorithm, steps, temperature, ...). None leaves the
    sampler's default. Raises ValueError for settings the sampler refuses."""
    if threshold is not None:
        sampler["threshold"] = threshold
    return InfillOptions(max_tokens=max_tokens, initial_tokens=min(INITIAL_TOKENS, max_tokens),
                         tokens_per_step=tokens_per_step, single_line=single_line,
                         stop=tuple(stop), min_tokens=min_tokens, **sampler)
