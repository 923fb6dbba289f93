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
from model.decoding.schedules import block_span
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


def write(model: LoadedModel, state: HoleState, end: int) -> None:
    """Extend the state's exact cache over positions up to `end` (finished blocks only). Exact
    mode writes as the reference does (the prompt in one forward); otherwise in chunks ending
    at multiples of WRITE_CHUNK."""
    cache = state.committed or BlockCache([])
    sequence = state.sequence()
    block_length = state.options.block_length
    while cache.length < end:
        stop = end if state.options.exact else min(end, (cache.length // WRITE_CHUNK + 1)
                                                    * WRITE_CHUNK)
        _, layers = run_rows(model, cache, sequence[cache.length:stop], block_length)
        writes = cache.writes + (1 if stop > state.hole_start else 0)
        cache = BlockCache(layers, stop, writes)
    state.committed = cache


def aligned_start(state: HoleState) -> int:
    """The sequence position where the current block's aligned block begins (the prompt's
    tail shares the first one)."""
    start, _ = block_span(state)
    size = state.options.block_length
    return (state.hole_start + start) // size * size


def block_pass(model: LoadedModel, state: HoleState) -> torch.Tensor:
    """One denoising forward of the current block (the prompt's tail that shares its aligned
    block included) against the exact cache, written first where finished blocks are missing
    from it. Nothing is kept. Returns hidden states at the masked positions (m, H)."""
    begin = aligned_start(state)
    write(model, state, begin)
    _, end = block_span(state)
    sequence = state.sequence()
    hidden, _ = run_rows(model, state.committed, sequence[begin:state.hole_start + end],
                         state.options.block_length)
    positions = state.masked.nonzero().squeeze(-1) + state.hole_start - begin  # (m,)
    return hidden[to_device(positions, hidden.device)]


@torch.inference_mode()
def generate_sub_blocks(model: LoadedModel, prompt: list[int], *, gen_length: int,
                        block_length: int, sub_block_length: int, threshold: float,
                        mask_id: int, stop_id: int) -> tuple[list[int], int]:
    """Fast-dLLM v2's greedy `generate` (the modeling.py of Efficient-Large-Model/Fast_dLLM_v2_*,
    `use_block_cache=False`), token for token and forward for forward: returns the ids (prompt,
    then answer, cut after the first stop token) and the number of forwards.

    Its rules: a prompt longer than one block has its whole blocks prefilled (one forward; when
    it ends on a block boundary, that forward's last logit's argmax is appended). Every later
    forward runs the sequence's last `block_length` tokens against the cache, at the cache's
    next positions (so a prompt of exactly one block is never seen: the reference's own rule).
    A block is denoised `sub_block_length` positions at a time, left to right; each step is one
    forward of the whole block, logits shifted right by one inside it (the block's first
    position keeps its own), and commits, among the sub-block's masks, the most probable one
    plus every one whose probability is above `threshold`. A finished block costs one forward
    that writes it to the cache, whose last logit's argmax is appended as the next block's
    first token. The block (or the answer) stops as soon as a stop token of the current block
    has no mask before it; such a block is not written."""
    mask_step = 32  # the reference's denoising forwards use the forward's default block_size
    ids = list(prompt)
    forwards = 0
    cache = BlockCache([])

    def logits_of(rows: list[int], keep: bool, mask_block: int) -> torch.Tensor:
        nonlocal cache, forwards
        hidden, layers = run_rows(model, cache, torch.tensor(rows), mask_block)
        forwards += 1
        if keep:
            cache = BlockCache(layers, cache.length + len(rows))
        return model.network.lm_head(hidden).float()  # (Q, V)

    if len(ids) > block_length:
        whole = len(ids) // block_length * block_length
        logits = logits_of(ids[:whole], True, block_length)
        if len(ids) == whole:
            ids.append(int(logits[-1].argmax()))
    original = len(prompt)

    def stopped(start: int) -> bool:
        tail = ids[start:]
        return stop_id in tail and mask_id not in tail[:tail.index(stop_id)]

    for _ in range(gen_length // block_length):
        if stop_id in ids[original:]:
            break
        start = len(ids)
        ids.extend([mask_id] * (block_length - start % block_length))
        base = len(ids) - block_length  # the block is ids[base:]
        while not stopped(start):
            if mask_id not in ids[base:]:
                logits = logits_of(ids[base:], True, block_length)
                ids.append(int(logits[-1].argmax()))
                break
            for sub in range(0, block_length, sub_block_length):
                lo, hi = base + sub, base + sub + sub_block_length
                while mask_id in ids[lo:hi] and not stopped(start):
                    logits = logits_of(ids[base:], False, mask_step)
                    shifted = torch.cat([logits[:1], logits[:-1]])[sub:sub + sub_block_length]
                    probs = torch.softmax(shifted, dim=-1)
                    best = probs.argmax(dim=-1)
                    confidence = probs.gather(-1, best[:, None])[:, 0]
                    masked = torch.tensor([t == mask_id for t in ids[lo:hi]])
                    confidence = torch.where(masked, confidence, -torch.inf)
                    commit = confidence > threshold
                    commit[confidence.argmax()] = True
                    for i in (commit & masked).nonzero().squeeze(-1).tolist():
                        ids[lo + i] = int(best[i])
    if stop_id in ids[original:]:
        ids = ids[:ids.index(stop_id, original) + 1]
    return ids, forwards
