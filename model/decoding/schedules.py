"""Step budgets and blocks: how many positions a step commits under Dream's timestep schedule
or LLaDA's uniform one, and LLaDA's semi-autoregressive blocks, left to right."""

from __future__ import annotations

import torch

from diffusion_contract.options import InfillOptions
from model.decoding.hole import HoleState

DREAM_EPS = 1e-3  # Dream's timestep schedule ends at eps, not 0 (generation_utils.py default)


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
    """[start, end) hole positions of the span being decoded: LLaDA's block, a block-diffusion
    family's block or sub-block (`HoleState.block_rule`), or the whole hole.

    Blocks of a block-diffusion family are aligned from the prompt's first token, so its
    first block is `block_offset` positions shorter (it shares an aligned block with the
    prompt's end); so are its sub-blocks. With shifted logits, a block's first position after
    written rows is a span of its own: the forward that writes them predicts it
    (`model.decoding.block.block_pass`)."""
    rule = state.block_rule
    size = rule.span if rule else state.options.block_length or state.hole.numel()
    offset = state.block_offset % size if rule else 0
    start = max(0, state.block * size - offset)
    end = min((state.block + 1) * size - offset, state.hole.numel())
    if rule is not None and starts_after_rows(state, start):
        return start, start + 1
    return start, end


def starts_after_rows(state: HoleState, start: int) -> bool:
    """Whether hole position `start` is still masked and begins an aligned block of a
    block-diffusion family with shifted logits, with rows before it: the forward that writes
    those rows predicts it."""
    position = state.hole_start + start
    return (state.block_rule.shifted and start < state.hole.numel()
            and bool(state.masked[start]) and position > 0
            and position % state.block_rule.length == 0)


def step_positions(state: HoleState) -> torch.Tensor:
    """The hole positions a step needs logits for: every masked one, or a block-diffusion
    family's masked ones in the span being decoded (`block_span`). (m,)"""
    masked = state.masked.nonzero().squeeze(-1)
    if state.block_rule is None:
        return masked
    start, end = block_span(state)
    return masked[(masked >= start) & (masked < end)]


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
