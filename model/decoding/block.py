"""Block diffusion: a hole denoised a few tokens at a time, each finished block cached exactly.

Stable-DiffCoder (ByteDance Seed, 2026) reads its sequence in blocks of `block_length` tokens
aligned from the prompt's first token: bidirectional inside a block, causal across blocks (its
`_make_block_causal_mask`: kron(tril(blocks), ones(block, block))). So the keys and values of
every block before the one being denoised never change again: they are computed once, exactly,
and the block being denoised runs alone against them.

This module holds what that costs the sampler, as data and two kinds of forward pass; the
steps themselves are `model.decoding.sampler`'s (`denoise_step`, `pick`, the schedules):

- `BlockCache`: the exact keys/values of the sequence's first `length` positions.
- `write`: extends it over finished blocks (the prompt first: prefill), keeping what it ran.
- `block_pass`: one denoising forward of the current block against it; nothing is kept (the
  block's keys change as its tokens do), so a finished block costs one more forward, a write.

`model.decoding.sampler.generate_exact` runs the published `generate_block` on these, token for
token and forward for forward.

The prompt's rows are written in chunks that end at multiples of `WRITE_CHUNK`, so a chunk's
keys/values are the same computation whether or not earlier chunks came from a document's
cache (`model.decoding.prompt_cache`): reusing them across keystrokes changes no completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from model.decoding import fast_step
from model.decoding.hole import HoleState
from model.decoding.pinned import to_device
from model.decoding.schedules import block_span, starts_after_rows, step_positions
from model.network.loader import LoadedModel

WRITE_CHUNK = 256  # tokens; a multiple of every block length


@dataclass
class BlockCache:
    """Exact keys and values of positions 0..length-1 (prompt and finished blocks)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv_heads, length, head_dim)
    length: int = 0
    writes: int = 0  # forwards that wrote a finished block of the hole (prefill not counted)


def block_causal_mask(start: int, end: int, block_length: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """(1, 1, end - start, end) additive mask of queries start..end-1 over keys 0..end-1: 0
    where the key's block is not after the query's, -inf elsewhere."""
    queries = torch.arange(start, end, device=device) // block_length
    keys = torch.arange(end, device=device) // block_length
    mask = torch.zeros((end - start, end), dtype=dtype, device=device)
    mask.masked_fill_(keys[None, :] > queries[:, None], float("-inf"))
    return mask[None, None]


@torch.inference_mode()
def run_rows(model: LoadedModel, cache: BlockCache, ids: torch.Tensor,
             block_length: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Positions cache.length.. holding `ids` (Q,) against the cache, under the block-causal
    mask. Returns their hidden states (Q, H) and every layer's keys/values over 0..end-1.
    Where the fast step runs (CUDA), through its layer loop (`fast_step.block_rows`)."""
    if fast_step.enabled(model):
        return fast_step.block_rows(model, cache.layers, cache.length, ids, block_length)
    start, end = cache.length, cache.length + ids.numel()
    past = DynamicCache(ddp_cache_data=cache.layers) if cache.layers else DynamicCache()
    hidden = model.network.model(
        input_ids=to_device(ids[None], model.device),
        position_ids=to_device(torch.arange(start, end)[None], model.device),
        attention_mask=block_causal_mask(start, end, block_length, model.dtype, model.device),
        past_key_values=past,
        use_cache=True,
    ).last_hidden_state[0]  # (Q, H)
    return hidden, [(layer.keys, layer.values) for layer in past.layers]


def write(model: LoadedModel, state: HoleState, end: int) -> torch.Tensor | None:
    """Extend the state's exact cache over positions up to `end` (finished blocks only). Exact
    mode writes as the reference does (the prompt in one forward); otherwise in chunks ending
    at multiples of WRITE_CHUNK. Returns the hidden state of the last row written (1, H), or
    None when there was nothing to write."""
    cache = state.committed or BlockCache([])
    sequence = state.sequence()
    block_length = state.options.block_length
    last = None
    while cache.length < end:
        stop = end if state.options.exact else min(end, (cache.length // WRITE_CHUNK + 1)
                                                    * WRITE_CHUNK)
        hidden, layers = run_rows(model, cache, sequence[cache.length:stop], block_length)
        state.forwards += 1
        last = hidden[-1:]
        writes = cache.writes + (1 if stop > state.hole_start else 0)
        cache = BlockCache(layers, stop, writes)
    state.committed = cache
    return last


def aligned_start(state: HoleState) -> int:
    """The sequence position where the current block's aligned block begins (the prompt's
    tail shares the first one)."""
    start, _ = block_span(state)
    size = state.options.block_length
    return (state.hole_start + start) // size * size


def truncated(cache: BlockCache, length: int) -> BlockCache:
    """The cache's first `length` positions."""
    return BlockCache([(k[..., :length, :], v[..., :length, :]) for k, v in cache.layers],
                      length, cache.writes)


def writes_first(state: HoleState) -> bool:
    """Whether the state's step is the forward that writes the rows before its block (a
    shifted family's block's first position comes from their last row: `block_pass`)."""
    return starts_after_rows(state, block_span(state)[0])


def denoising_rows(state: HoleState) -> tuple[int, int]:
    """[begin, end) sequence positions a denoising forward of the current block runs: its
    aligned block (with the prompt's tail that shares it), up to the hole's end."""
    begin = aligned_start(state)
    return begin, min(begin + state.block_rule.length, state.hole_start + state.hole.numel())


def step_rows(state: HoleState, begin: int) -> torch.Tensor:
    """Indices into a denoising forward's rows (from sequence position `begin`) whose hidden
    states score the step's positions (`step_positions`): a position's own row, or with
    shifted logits the one before it in the block (the block's first position: its own)."""
    rows = step_positions(state) + state.hole_start - begin  # (m,)
    return (rows - 1).clamp(min=0) if state.block_rule.shifted else rows


def block_pass(model: LoadedModel, state: HoleState) -> torch.Tensor:
    """One denoising forward of the current block (the prompt's tail that shares its aligned
    block included) against the exact cache, written first where finished blocks are missing
    from it. Nothing is kept. Returns hidden states at the step's positions (m, H):
    `model.decoding.schedules.step_positions`, the block's or its sub-block's masks.

    With shifted logits (`BlockRule.shifted`) a position's row is the one before it in the
    block (`step_rows`), and the first position of a block after written rows is a step of its
    own, run by the forward that writes the rows before it: its row is the last of them."""
    begin, end = denoising_rows(state)
    if writes_first(state):
        if state.committed is not None and state.committed.length >= begin:
            # written already (a document's rows): the block before is written again
            state.committed = truncated(state.committed, begin - state.block_rule.length)
        return write(model, state, begin)
    write(model, state, begin)
    hidden, _ = run_rows(model, state.committed, state.sequence()[begin:end],
                         state.block_rule.length)
    state.forwards += 1
    return hidden[to_device(step_rows(state, begin), hidden.device)]
