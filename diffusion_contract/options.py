"""How to fill one hole: `InfillOptions`, and the reference samplers' rules it can follow.

Torch-free: the language server, the service's wire format and the command line read the
names, defaults and validation from here.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any

SCORES = ("confidence", "margin", "entropy")
# how the decoder layers' weights are stored (model.network.quantize): the checkpoint's dtype, 8 or
# 4 bits, or what model.network.quantize.choose_auto picks for the device and model
QUANTIZATIONS = ("none", "int8", "int4", "auto")
# bytes a weight takes per scheme, scales included (none: bf16; int8: one scale per row, about
# nothing; int4: a bf16 scale and zero per group of 128), for memory estimates
BYTES_PER_WEIGHT = {"none": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 128}
CUDA_ROOM = 0.2  # auto on CUDA: weights may take at most this much less than the free memory


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


COMMIT = "commit"  # how many positions a step commits: set by editors and the service too
REFERENCE = "reference"  # a reference sampler's setting (Dream, LLaDA; docs/models.md)


def _setting(group: str, help: str, choices: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"setting": (group, help, choices)}


@dataclass(frozen=True)
class InfillOptions:
    """How to fill one hole. Defaults: deterministic, a few tokens per step.

    The fields with a `setting` are the ones an editor, a service client and the command line
    may give: `SAMPLER_SETTINGS` and `COMMIT_SETTINGS` read their names, types, defaults and
    help from here, and `settings_problem` validates them by building InfillOptions."""

    max_tokens: int = 64  # the hole never grows past this many tokens
    initial_tokens: int = 16  # first guess of the hole's length
    extend_by: int = 8  # masks appended when the hole fills with real tokens unfinished
    threshold: float = field(default=0.9, metadata=_setting(
        COMMIT, "commit every masked position scoring above this, each step, in [0, 1] "
                "(1: one a step)"))
    tokens_per_step: int | None = field(default=None, metadata=_setting(
        COMMIT, "commit exactly this many positions a step instead of the threshold"))
    score: str = "confidence"  # confidence | margin | entropy (all in [0, 1])
    single_line: bool = False  # stop at the end of the line
    stop: tuple[str, ...] = ()  # stop words: the text ends before the first one
    reuse_context: bool = True  # cache prefix/suffix keys and values; later steps run the hole only
    refresh_every: int = 4  # with reuse_context: full pass every this many steps (0: never)
    min_tokens: int = 0  # the first this many hole positions may not end the hole (or line)
    end_runs: bool = True  # a committed end also commits the run of predicted ends before it
    # -- reference samplers (Dream, LLaDA); see `Rule` and docs/models.md's settings table ----
    algorithm: str | None = field(default=None, metadata=_setting(
        REFERENCE, "a reference sampler (ALGORITHMS: Dream's alg, LLaDA's remasking); none: "
                   "the threshold sampler", tuple(ALGORITHMS)))
    steps: int | None = field(default=None, metadata=_setting(
        REFERENCE, "a step budget: the hole is then max_tokens long, filled on a schedule"))
    block_length: int | None = field(default=None, metadata=_setting(
        REFERENCE, "LLaDA's semi-autoregressive blocks, left to right"))
    temperature: float = field(default=0.0, metadata=_setting(
        REFERENCE, "0: the likeliest token (deterministic)"))
    top_p: float = field(default=NO_TOP_P, metadata=_setting(
        REFERENCE, "nucleus filter before sampling, in (0, 1] (1: off)"))
    top_k: int = field(default=NO_TOP_K, metadata=_setting(
        REFERENCE, "keep the k likeliest tokens before sampling (0: off)"))
    alg_temp: float = field(default=0.0, metadata=_setting(
        REFERENCE, "Dream: above 0 draws positions from softmax(score / alg_temp)"))
    cfg_scale: float = field(default=0.0, metadata=_setting(
        REFERENCE, "LLaDA: above 0 adds a pass with prefix and suffix masked (guidance)"))
    seed: int = field(default=0, metadata=_setting(REFERENCE, "for temperature above 0"))
    # Stable-DiffCoder's generate_block with a threshold: the step budget only says which
    # steps run; each commits its best position and every other scoring at least `threshold`
    threshold_gates_steps: bool = False
    exact: bool = field(default=False, metadata=_setting(
        REFERENCE, "the published algorithm verbatim: full passes, a fixed-length hole, no "
                   "end closing, end runs or min_tokens"))

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
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must lie in [0, 1]")
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


# -- the settings editors, service clients and the command line give ---------------------------


@dataclass(frozen=True)
class Setting:
    """One InfillOptions field that editors, the service's clients and the command line may
    set: the language server's settings, the wire's fields and the `infill` flags are built
    from these."""

    name: str
    type: Any  # the field's type (a name out of `choices` is checked by InfillOptions, which
    # says the known ones)
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)


def _settings(group: str) -> tuple[Setting, ...]:
    hints = typing.get_type_hints(InfillOptions)
    found = []
    for option in fields(InfillOptions):
        if "setting" not in option.metadata or option.metadata["setting"][0] != group:
            continue
        _, help, choices = option.metadata["setting"]
        found.append(Setting(option.name, hints[option.name], option.default, help, choices))
    return tuple(found)


COMMIT_SETTINGS = _settings(COMMIT)  # threshold, tokens_per_step
SAMPLER_SETTINGS = _settings(REFERENCE)  # algorithm, steps, ..., seed, exact


def settings_problem(max_tokens: int, **given: Any) -> str | None:
    """What the sampler refuses in `given` (settings by name) for a hole of at most
    `max_tokens`, in one line; None when it takes them."""
    try:
        hole_options(max_tokens, **given)
    except (TypeError, ValueError) as error:
        return str(error)
    return None


def settings_struct(name: str, settings: tuple[Setting, ...], *, unset: bool = False,
                    **struct_options: Any) -> type:
    """A msgspec Struct type with one field per setting, its default the sampler's; `unset`:
    every field may be left out (UNSET) or null, meaning the sampler's default."""
    import msgspec

    if unset:
        spec = [(s.name, s.type | None | msgspec.UnsetType, msgspec.UNSET) for s in settings]
    else:
        spec = [(s.name, s.type, s.default) for s in settings]
    return msgspec.defstruct(name, spec, **struct_options)
