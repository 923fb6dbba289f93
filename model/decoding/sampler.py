"""Masked-diffusion infilling: fill a hole between a prefix and a suffix in a few parallel steps.

The hole starts as `n` mask tokens. Each step is one forward pass (`model.decoding.passes`) over
prefix + hole + suffix; the step commits the positions its rule picks (`model.decoding.scoring`,
under a step budget `model.decoding.schedules`), and a committed token never changes; the hole
closes, grows or is edited as its tokens say (`model.decoding.hole`). Options:
`diffusion_contract.options`.

A block-diffusion family (`model.decoding.block`) runs the same steps on a hole after its prompt,
one block at a time against an exact cache; `generate_exact` is its published sampler.

The functions are pure over a `HoleState`; `forward_holes` runs the network for any number of
states at once, so the single-request loop (`infill`) and the engine's batched loop share one
step function (`apply_step`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from diffusion_contract.options import InfillOptions
from model.decoding import block
from model.decoding.hole import (
    NEWLINE,
    BlockRule,
    HoleState,
    Infill,
    StepTrace,
    close_hole,
    edit_hole,
    finish_or_grow,
    is_end,
    layout_ids,
    result,
)
from model.decoding.passes import forward_holes
from model.decoding.schedules import advance_schedule, step_positions
from model.decoding.scoring import (
    Scored,
    pick_spans,
    with_bans,
    with_end_runs,
)
from model.network.families import Family
from model.network.loader import LoadedModel

if TYPE_CHECKING:
    from model.decoding.prompt_cache import PromptCache



def new_state(model: LoadedModel, prefix: str, suffix: str, options: InfillOptions) -> HoleState:
    prefix_ids, suffix_ids = layout_ids(model, prefix, suffix)
    return new_state_from_ids(model, prefix_ids, suffix_ids, options)


def new_state_from_ids(model: LoadedModel, prefix_ids: list[int], suffix_ids: list[int],
                       options: InfillOptions) -> HoleState:
    """A hole between token ids laid out already. A block-diffusion family's hole
    (`model.decoding.block`) starts one block long: the first block ends where the prompt's aligned
    block does, and the hole grows a block at a time; its family's rule (`block_rule`) is the
    state's data."""
    n, offset, rule = options.first_length, None, None
    family = model.family
    if family.block_length:
        if suffix_ids:
            raise ValueError(f"family {family.name} denoises blocks after its prompt: "
                             "nothing may follow the hole (give it a FIM layout)")
        options = dataclasses.replace(
            options, block_length=options.block_length or family.block_length)
        rule = block_rule(family, options.block_length)
        offset = len(prefix_ids) % options.block_length
        n = min(options.block_length - offset, options.max_tokens)
    state = HoleState(
        prefix_ids=prefix_ids,
        suffix_ids=suffix_ids,
        hole=torch.full((n,), model.ids.mask, dtype=torch.long),
        masked=torch.ones(n, dtype=torch.bool),
        options=options,
        generator=torch.Generator().manual_seed(options.seed),
        expansions_left=options.max_tokens if model.ids.expand is not None else 0,
        block_offset=offset,
        block_rule=rule,
    )
    advance_schedule(state)
    return state


def block_rule(family: Family, length: int) -> BlockRule:
    """A block-diffusion family's rule for blocks of `length` tokens (its sub-blocks are kept
    only where they divide the block)."""
    span = family.sub_block_length or length
    return BlockRule(length, span if length % span == 0 else length,
                     family.shifted_logits, family.block_stop)


def apply_step(model: LoadedModel, state: HoleState, logits: torch.Tensor | Scored) -> None:
    """Commit tokens from one forward pass: `apply_spans_step` with one span. logits: (m, V)
    for the m positions `model.decoding.schedules.step_positions` names (the masked ones), in
    order (consumed: ids that may not be sampled are set to -inf in place), or the step
    already `Scored` where it ran (those bans applied there:
    `model.decoding.scoring.step_head`)."""
    apply_spans_step(model, [state], [logits])


def apply_spans_step(model: LoadedModel, spans: Sequence[HoleState],
                     logits: Sequence[torch.Tensor | Scored]) -> int:
    """The one denoising step over the spans of one sequence (one hole is one span; several
    holes: `model.decoding.multi_hole`): each span's bans (`with_bans`), one selection across them
    all (`pick_spans`), then each span's commits, closing, edits and finish (`commit`). logits:
    per span, as `apply_step` takes them. Returns how many positions were committed."""
    masked = [step_positions(span) for span in spans]  # (m_i,) each
    logits = [with_bans(model, span, rows, positions)
              for span, rows, positions in zip(spans, logits, masked, strict=True)]
    picks = pick_spans(spans, logits, masked)
    return sum(commit(model, span, positions, *picked)
               for span, positions, picked in zip(spans, masked, picks, strict=True))


def closes(model: LoadedModel, options: InfillOptions, token: int) -> bool:
    """Whether a committed `token` ends the hole (an end token, or a newline single-line)."""
    return is_end(model, token) or (options.single_line
                                     and NEWLINE in model.tokenizer.decode([token]))


def commit(model: LoadedModel, state: HoleState, masked_positions: torch.Tensor,
           chosen: torch.Tensor, tokens: torch.Tensor, confidences: torch.Tensor) -> int:
    """Commit the `chosen` (indices into `masked_positions`) of a hole's step in hole order,
    with the run of ends before a chosen end (`with_end_runs`): a committed end (or newline,
    single-line) closes the hole there, and a position chosen after it stays end-of-hole.
    Then DreamOn's edits, and the hole finished or grown. Returns how many positions were
    committed."""
    options = state.options
    if options.end_runs and not options.exact:
        chosen = with_end_runs(model, chosen, masked_positions, tokens)
    committed = []
    scores = state.confidences
    scores += [math.nan] * (state.hole.numel() - len(scores))
    for index in sorted(chosen.tolist(), key=lambda i: int(masked_positions[i])):
        position, token = int(masked_positions[index]), int(tokens[index])
        if not state.masked[position]:  # an end chosen before it this step closed the hole
            continue
        state.hole[position] = token
        # the references find masks by their id: a mask "committed" stays one (exact mode)
        state.masked[position] = token == model.ids.mask
        scores[position] = float(confidences[index])
        committed.append((position, token))
        if not options.exact and closes(model, options, token):  # the references do not
            close_hole(state, model, position + 1)
    state.steps += 1
    edits = sorted((p, t) for p, t in committed if t in model.ids.hole_edits)
    if edits:
        edit_hole(model, state, edits)
    state.trace.append(StepTrace(committed, state.hole.tolist()))
    finish_or_grow(model, state)
    if options.steps is not None:
        state.block_step += 1
    advance_schedule(state)
    return len(committed)


def denoise_step(model: LoadedModel, states: Sequence[HoleState],
                 cache: PromptCache | None = None,
                 documents: Sequence[str | None] | None = None) -> None:
    """One denoising step of any number of holes: one forward pass for all, then each one's
    commits. After a hole's first step, its context is kept as its document's (`cache`,
    `documents`: one key or None per state). The step of the single-request loop below, the
    engine's batched loop and the demo."""
    for state, logits in zip(states, forward_holes(model, states, scored=True), strict=True):
        apply_step(model, state, logits)
    if cache is not None and documents is not None:
        for state, document in zip(states, documents, strict=True):
            if document is not None and state.steps == 1:
                cache.store(model, document, state)


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
    state after every step but the last (a live preview: `model.decoding.preview`). Timings:
    `forward_ms` is the time in denoising steps (forward passes and commits)."""
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
        denoise_step(model, [state], cache, [document])
        forward_s += time.perf_counter() - before
        if on_step is not None and not state.finished:
            on_step(state)
    timings = {
        "tokenize_ms": (tokenized - started) * 1e3,
        "forward_ms": forward_s * 1e3,
        "total_ms": (time.perf_counter() - started) * 1e3,
    }
    return result(model, state, timings)


def generate_exact(model: LoadedModel, input_ids: torch.Tensor | list[int], *,
                   steps: int = 128, gen_length: int = 128, block_length: int | None = None,
                   temperature: float = 0.0, remasking: str = "low_confidence",
                   tokenizer: object = None, mask_id: int | None = None,
                   threshold: float | None = 0.95, shift: bool = False,
                   eos_id: int | None = None, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Stable-DiffCoder's `generate_block` (modeling_stable_diffcoder.py), reproduced token for
    token and forward for forward on `model.decoding.sampler`'s steps: returns the same (1, L) ids
    (the prompt, then the answer; cut at the end of the block where `eos_id` appeared, every
    position from that eos on set to it) and the same forward count (`nfe`: denoising forwards
    plus one write per finished block; the prefill is not counted).

    The keywords are `generate_block`'s (its `tokenizer` is unused there too); `input_ids`:
    (1, P) or a list; `block_length` defaults to the family's, `mask_id` to its mask; `eos_id`
    None looks for no end, as the reference does. Sampled runs (`temperature` > 0) draw from a
    generator seeded with `seed`: the reference's distribution, not its random numbers."""
    del tokenizer  # generate_block takes it and never reads it
    if model.family.sub_block_length:
        return _generate_exact_sub_blocks(model, input_ids, gen_length=gen_length,
                                          block_length=block_length, mask_id=mask_id,
                                          threshold=threshold, eos_id=eos_id)
    if shift:
        raise ValueError("shift=True (shifted logits) is not Stable-DiffCoder's setting and is "
                         "not supported")
    prompt = [int(t) for t in torch.as_tensor(input_ids).reshape(-1).tolist()]
    block_length = block_length or model.family.block_length
    if not block_length:
        raise ValueError(f"family {model.family.name} is not a block-diffusion family")
    if gen_length % block_length:
        raise ValueError("gen_length must be a multiple of block_length (generate_block asserts)")
    if steps % (gen_length // block_length):
        raise ValueError("steps must be a multiple of gen_length // block_length "
                         "(generate_block asserts)")
    options = InfillOptions(
        max_tokens=gen_length, steps=steps, block_length=block_length,
        algorithm=remasking, temperature=temperature, exact=True, seed=seed,
        threshold=threshold if threshold is not None else 0.0,
        threshold_gates_steps=threshold is not None)
    ids = dataclasses.replace(model.ids, end_of_hole=eos_id if eos_id is not None else -1,
                              mask=model.ids.mask if mask_id is None else mask_id)
    looking = dataclasses.replace(model, ids=ids) if ids != model.ids else model
    state = new_state_from_ids(looking, prompt, [], options)
    while not state.finished:
        denoise_step(looking, [state])
    eos_cut = state.finish_reason == "end"
    if not eos_cut:  # the reference writes the last block too
        block.write(looking, state, state.hole_start + state.hole.numel())
    answer = state.hole.tolist()
    if eos_cut:  # the first eos of the last block (the hole ends at a block's end)
        last = max(0, (len(answer) + state.block_offset - 1) // block_length * block_length
                   - state.block_offset)
        first = answer.index(eos_id, last)
        answer = answer[:first] + [eos_id] * (len(answer) - first)
    forwards = state.steps + (state.committed.writes if state.committed else 0)
    return torch.tensor([prompt + answer], dtype=torch.long), forwards


def _generate_exact_sub_blocks(model: LoadedModel, input_ids: torch.Tensor | list[int], *,
                               gen_length: int, block_length: int | None, mask_id: int | None,
                               threshold: float | None,
                               eos_id: int | None) -> tuple[torch.Tensor, int]:
    """Fast-dLLM v2's greedy `generate` (the modeling.py of Efficient-Large-Model/Fast_dLLM_v2_*,
    `use_block_cache=False`) on this sampler's steps, token for token and forward for forward:
    returns its ids (the prompt, then the answer, cut after the first stop token) and its
    number of forwards (every one counted, the prefill too). `gen_length` is its
    `max_new_tokens`, `eos_id` its `stop_token` (default: the family's end token), `threshold`
    None its default 1 (one position a step); `steps` has no part in it.

    Its rules, as the family's `BlockRule` states them: sub-blocks, shifted logits, a step
    commits the sub-block's most probable mask and every one above `threshold`; a finished
    block's write forward predicts the next block's first token; the answer ends once a stop
    token has no mask before it ("settled"). Two of its quirks are the prompt's: a prompt of
    exactly one block is never seen (its block's rows run at positions 0..), and the answer
    runs `gen_length // block_length` blocks past the prompt's last whole block, plus the token
    the last write predicts."""
    prompt = [int(t) for t in torch.as_tensor(input_ids).reshape(-1).tolist()]
    block_length = block_length or model.family.block_length
    if gen_length < block_length:
        raise ValueError("gen_length must be at least one block (generate runs "
                         "gen_length // block_length blocks)")
    seen = [] if len(prompt) == block_length else prompt
    end = len(seen) // block_length * block_length + gen_length // block_length * block_length
    options = InfillOptions(max_tokens=end + 1 - len(seen), block_length=block_length,
                            exact=True, threshold=1.0 if threshold is None else threshold)
    stop = model.ids.end_of_hole if eos_id is None else eos_id
    ids = dataclasses.replace(model.ids, end_of_hole=stop, extra_end=(),
                              mask=model.ids.mask if mask_id is None else mask_id)
    looking = dataclasses.replace(model, ids=ids)
    state = new_state_from_ids(looking, seen, [], options)
    while not state.finished:
        denoise_step(looking, [state])
    answer = state.hole.tolist()
    if stop in answer:
        answer = answer[:answer.index(stop) + 1]
    return torch.tensor([prompt + answer], dtype=torch.long), state.forwards
