"""Forward passes over any number of holes: the logits of every masked position.

A hole's first pass runs its whole sequence (or, with the document's cached context, a partial
pass: `model.decoding.prompt_cache`); later ones run only the hole's window against the context's
cached keys and values (the dual cache of Fast-dLLM), refreshed every `refresh_every` steps. Several
holes share one batched pass; one hole alone on CUDA runs through `model.decoding.fast_step` (its
own layer loop, the hole step replayed as a CUDA graph), several holes through
`model.decoding.packed_step` (their rows packed into one pass, attention per hole: the joining
holes' full and partial passes beside the running holes' hole-only steps, `_packed_pass`), and
several block-diffusion holes' block forwards through `model.decoding.packed_blocks` alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from transformers import DynamicCache

from diffusion_contract.options import InfillOptions
from model.decoding import fast_step, packed_step
from model.decoding.block import block_pass
from model.decoding.hole import ContextCache, HoleState
from model.decoding.packed_blocks import packed_block_pass
from model.decoding.pinned import to_device
from model.decoding.scoring import Scored, step_head
from model.network.loader import LoadedModel

# transformers 5.x renames the forward's `past_key_values` to `cache` (removed in 5.40) and warns
# on every model load; every 5.x takes the old name, which the forward calls below pass
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated",
                        category=FutureWarning)


def logit_positions(state: HoleState, shifted: bool) -> torch.Tensor:
    """Sequence positions whose logits predict the still-masked hole tokens. (m,)"""
    positions = state.masked.nonzero().squeeze(-1) + state.hole_start
    return positions - 1 if shifted else positions


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
    return hidden[to_device(positions, hidden.device)]


@torch.inference_mode()
def _full_pass(model: LoadedModel, states: Sequence[HoleState]) -> list[torch.Tensor]:
    """Whole sequences, batched: right-padded, padding masked out of attention, so a hole's
    hidden states do not depend on what it is batched with. Returns (m_i, H) per state and,
    when asked, keeps each state's context keys/values for hole-only passes."""
    if len(states) == 1 and fast_step.enabled(model):
        return [_rows_pass_full(model, states[0])]
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
        input_ids=to_device(input_ids, model.device),
        attention_mask=to_device(attention, model.device) if padded else None,
        past_key_values=cache,
        use_cache=keep_cache,
    ).last_hidden_state  # (B, L, H)
    shifted = model.family.shifted_logits
    rows = []
    for row, state in enumerate(states):
        rows.append(_rows_at(hidden[row], logit_positions(state, shifted)))
        state.full_passes += 1
        if state.options.caches_context:
            _keep_context(state, [(layer.keys[row : row + 1], layer.values[row : row + 1])
                                  for layer in cache.layers], lengths[row], shifted)
    return rows


def _rows_pass_full(model: LoadedModel, state: HoleState) -> torch.Tensor:
    """`_full_pass` of one hole through `model.decoding.fast_step`'s layer loop. (m, H)"""
    sequence = state.sequence()
    length = sequence.numel()
    hidden, layers = fast_step.rows_pass(model, sequence, torch.arange(length))
    shifted = model.family.shifted_logits
    state.full_passes += 1
    if state.options.caches_context:
        _keep_context(state, layers, length, shifted)
    return _rows_at(hidden, logit_positions(state, shifted))


def _keep_context(state: HoleState, layers: list[tuple[torch.Tensor, torch.Tensor]],
                  length: int, shifted: bool) -> None:
    """Give `state` the context cache of its full pass: every layer's keys and values
    (1, kv_heads, >= length, D) of its whole sequence, less its window (and any padding)."""
    start, end = window(state, shifted)
    state.context = ContextCache(
        [(_outside(k, start, end, length), _outside(v, start, end, length)) for k, v in layers],
        hole_len=state.hole.numel())


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
    if len(states) == 1 and fast_step.enabled(model):
        return [_fixed_shape_hole_pass(model, states[0])]
    if len(states) > 1 and packed_step.enabled(model):
        return _packed_hole_pass(model, states)
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
        input_ids=to_device(ids, model.device),
        position_ids=to_device(positions, model.device),
        past_key_values=DynamicCache(ddp_cache_data=layers),
        attention_mask=to_device(mask, model.device) if mask is not None else None,
        use_cache=True,
    ).last_hidden_state  # (B, W, H)
    rows = []
    for row, (state, (start, _)) in enumerate(zip(states, windows, strict=True)):
        state.context.age += 1
        rows.append(_rows_at(hidden[row], logit_positions(state, shifted) - start))
    return rows


def _fixed_shape_hole_pass(model: LoadedModel, state: HoleState) -> torch.Tensor:
    """`_hole_pass` of one hole through `model.decoding.fast_step` (a CUDA graph replay). (m, H)"""
    shifted = model.family.shifted_logits
    start, end = window(state, shifted)
    fused = fast_step.switches(model).fused_projections
    hidden = fast_step.hole_steps(model).run(state.context.layers, state.context,
                                             state.sequence()[start:end], start,
                                             fused)  # (W, H)
    state.context.age += 1
    return _rows_at(hidden, logit_positions(state, shifted) - start)


def _packed_hole_pass(model: LoadedModel, states: Sequence[HoleState]) -> list[torch.Tensor]:
    """`_hole_pass` of several holes through `model.decoding.packed_step`: their windows' rows
    packed into one pass, attention per hole over its own context. Returns (m_i, H)."""
    return _packed_pass(model, [_window_part(model, state) for state in states])


class _Part(NamedTuple):
    """One hole's part of a packed pass (`_packed_pass`): its segment, and what turns the
    segment's hidden states (Q, H) and kept keys and values into the rows at its masked
    positions (m, H), updating its context cache."""

    segment: packed_step.Segment
    finish: Callable[[torch.Tensor, list | None], torch.Tensor]
    context: ContextCache | None = None  # a hole-only step's: what its segment's past is


def _window_part(model: LoadedModel, state: HoleState) -> _Part:
    """A hole-only step: the window against the hole's cached context."""
    shifted = model.family.shifted_logits
    start, end = window(state, shifted)

    def finish(hidden: torch.Tensor, _: list | None) -> torch.Tensor:
        state.context.age += 1
        return _rows_at(hidden, logit_positions(state, shifted) - start)

    return _Part(packed_step.window_segment(state.sequence()[start:end], start,
                                            state.context.layers), finish, state.context)


def _full_part(model: LoadedModel, state: HoleState) -> _Part:
    """A full pass: the whole sequence, its keys and values kept for the context cache (as
    `_full_pass` keeps them)."""
    shifted = model.family.shifted_logits
    sequence = state.sequence()
    caches = state.options.caches_context

    def finish(hidden: torch.Tensor, layers: list | None) -> torch.Tensor:
        state.full_passes += 1
        if caches:
            _keep_context(state, layers, sequence.numel(), shifted)
        return _rows_at(hidden, logit_positions(state, shifted))

    return _Part(packed_step.Segment(sequence, torch.arange(sequence.numel()), None, caches),
                 finish)


def _partial_part(model: LoadedModel, state: HoleState) -> _Part:
    """The document cache's partial pass (`model.decoding.prompt_cache.Reuse`)."""
    reuse = state.reuse
    ids, positions, past = reuse.queries(model, state)
    return _Part(packed_step.Segment(ids, positions, past, keep=True),
                 lambda hidden, rows: reuse.finish(model, state, hidden, rows))


def _first_part(model: LoadedModel, state: HoleState) -> _Part:
    """The pass a hole needs now: partial (its document's context to reuse), full (no fresh
    context cache) or hole-only."""
    if not needs_full_pass(state):
        return _window_part(model, state)
    if state.reuse is not None and state.context is None:
        return _partial_part(model, state)
    return _full_part(model, state)


def _packed_pass(model: LoadedModel, parts: Sequence[_Part]) -> list[torch.Tensor]:
    """Holes' `parts` in one `model.decoding.packed_step` pass: hole-only steps beside
    full and partial passes, every row through the projections and the MLP together, each
    hole's attention over its own past and rows. Returns (m_i, H) per part.

    With DIFFUSION_LSP_PACKED_GRAPHS the hole-only steps replay their bucket's CUDA graph
    instead (`fast_step.HoleSteps.run_packed`), and the full and partial passes beside them
    share a packed pass of their own (uncaptured: their shapes vary too much), unless the
    bucket is over its memory bound: on a GPU a second read of the weights costs less than
    launching a whole step's kernels one by one."""
    on = fast_step.switches(model)
    hidden: list[torch.Tensor | None] = [None] * len(parts)
    kept: list[list | None] = [None] * len(parts)
    steps = [i for i, part in enumerate(parts) if part.context is not None]
    if on.packed_graphs and steps:
        captured = fast_step.hole_steps(model).run_packed(
            [fast_step.PackedWindow(parts[i].segment.ids, int(parts[i].segment.positions[0]),
                                    parts[i].segment.past, parts[i].context) for i in steps],
            on.fused_projections)
        if captured is not None:  # None: over the bound, every part in the pass below
            for i, rows in zip(steps, captured, strict=True):
                hidden[i] = rows
    rest = [i for i in range(len(parts)) if hidden[i] is None]
    if rest:
        passed, keeping = packed_step.packed_pass(model, [parts[i].segment for i in rest],
                                                  on.fused_projections)
        for i, rows, layers in zip(rest, passed, keeping, strict=True):
            hidden[i], kept[i] = rows, layers
    return [part.finish(rows, layers)
            for part, rows, layers in zip(parts, hidden, kept, strict=True)]


def _scored_step(model: LoadedModel, states: Sequence[HoleState]) -> Scored | None:
    """The step of one greedy hole with a fresh context cache, its LM head and scoring inside
    the hole step's CUDA graph (the graph head, DIFFUSION_LSP_GRAPH_HEAD): the one host sync
    is the (2, n) copy of tokens and confidences. None where that does not apply (several
    holes, a full or partial pass, random draws, guidance, the switch off)."""
    if len(states) != 1 or states[0].blockwise:
        return None
    state, on = states[0], fast_step.switches(model)
    options = state.options
    if (not on.graph_head or needs_full_pass(state) or samples_on_host(options)
            or options.cfg_scale > 0):
        return None
    head, bans = step_head(model, state)
    start, end = window(state, model.family.shifted_logits)
    scores = fast_step.hole_steps(model).run(
        state.context.layers, state.context, state.sequence()[start:end], start,
        on.fused_projections, head, bans).cpu()  # (2, n)
    state.context.age += 1
    masked = state.masked.nonzero().squeeze(-1)
    return Scored(scores[0, masked].long(), scores[1, masked],
                  model.network.lm_head.weight.shape[0])


def samples_on_host(options: InfillOptions) -> bool:
    """Whether a step draws random numbers (from the state's CPU generator): then its logits
    come to the CPU. Greedy steps are scored where the logits are, and only the (m,) tokens
    and scores cross over (a 64-token hole's logits over a 152k vocabulary are 39 MB)."""
    rule = options.rule
    return options.temperature > 0 or rule.order in ("random", "origin") or options.alg_temp > 0


@torch.inference_mode()
def forward_holes(model: LoadedModel, states: Sequence[HoleState],
                  scored: bool = False) -> list[torch.Tensor | Scored]:
    """One denoising forward pass for any number of holes: logits at each state's masked
    positions, as a list of (m_i, V) float tensors.

    States whose context cache is fresh run their hole only; the rest run their whole
    sequences (which also refreshes their caches) or, with their document's context, a partial
    pass. Several holes share one packed pass, first passes and hole-only steps together
    (`_packed_pass`; with DIFFUSION_LSP_PACKED_FIRST_PASSES=0 the first passes share
    transformers' padded batch apart from the hole-only steps' packed one). With `scored`, a
    lone greedy hole-only step may come back as `Scored` instead (`_scored_step`), which
    `model.decoding.sampler.apply_step` takes as it takes logits.
    """
    if scored and (step := _scored_step(model, states)) is not None:
        return [step]
    hidden: dict[int, torch.Tensor] = {}
    blocks = [i for i, state in enumerate(states) if state.blockwise]
    if len(blocks) > 1 and packed_step.enabled(model):  # several blocks: one packed pass
        hidden.update(zip(blocks, packed_block_pass(model, [states[i] for i in blocks]),
                          strict=True))
    for i in blocks:  # block diffusion: the block against its exact cache
        if i not in hidden:
            hidden[i] = block_pass(model, states[i])
    # LLaDA's classifier-free guidance (generate.py): each guided hole runs twice, as it is
    # and with its prompt masked (`unconditioned`), the twins batched with the full passes
    guided = [i for i, s in enumerate(states) if s.options.cfg_scale > 0]
    twins = [unconditioned(model, states[i]) for i in guided]
    rest = [i for i in range(len(states)) if i not in hidden]
    if len(rest) + len(twins) > 1 and packed_step.first_passes(model):
        # every hole's pass, first ones too, in one packed pass
        passed = _packed_pass(model, [_first_part(model, states[i]) for i in rest]
                              + [_full_part(model, twin) for twin in twins])
        hidden.update(zip(rest, passed[: len(rest)], strict=True))
        return _logits(model, states, hidden, guided, passed[len(rest):])
    full = [i for i in rest if needs_full_pass(states[i])]
    for i in full:  # a first pass that reuses its document's context (model.decoding.prompt_cache)
        if states[i].reuse is not None and states[i].context is None:
            hidden[i] = states[i].reuse.run(model, states[i])
    full = [i for i in full if i not in hidden]
    unguided_rows: list[torch.Tensor] = []
    if full or twins:
        passed = _full_pass(model, [states[i] for i in full] + twins)
        hidden.update(zip(full, passed[: len(full)], strict=True))
        unguided_rows = passed[len(full):]  # (m_i, H) per guided hole, in order
    cached = [i for i in range(len(states)) if i not in hidden]
    if cached:
        hidden.update(zip(cached, _hole_pass(model, [states[i] for i in cached]), strict=True))
    return _logits(model, states, hidden, guided, unguided_rows)


def _logits(model: LoadedModel, states: Sequence[HoleState], hidden: dict[int, torch.Tensor],
            guided: list[int], unguided_rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """`forward_holes`' logits from each state's rows (m_i, H) and the guided holes' twins'
    rows: one LM head over them all, guidance applied."""
    rows = [hidden[i] for i in range(len(states))] + unguided_rows
    logits = model.network.lm_head(torch.cat(rows)).float()  # (M, V), on the model's device
    split = list(logits.split([r.shape[0] for r in rows]))
    conditioned, unguided = split[: len(states)], split[len(states):]
    for i, unconditioned_logits in zip(guided, unguided, strict=True):
        states[i].guidance_passes += 1
        conditioned[i] = guide(conditioned[i], unconditioned_logits, states[i].options.cfg_scale)
    return [rows.cpu() if samples_on_host(state.options) else rows
            for state, rows in zip(states, conditioned, strict=True)]


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
