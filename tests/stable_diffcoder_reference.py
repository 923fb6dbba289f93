"""Stable-DiffCoder's published sampler, re-expressed for the tests (not copied).

Source: the model's `modeling_stable_diffcoder.py` (ByteDance-Seed/Stable-DiffCoder-8B-Base on
the Hugging Face hub, MIT licence, (c) 2026 ByteDance Ltd.), class `StableDiffcoderForCausalLM`
(a `LlamaForCausalLM` subclass that adds `generate_block` and its helpers, nothing to the
network), read through the project's search tool. What it does, rule by rule, and written here
in this project's words so that the tests compare `model.decoding.sampler.generate_exact` against
the published behaviour rather than against itself:

- x = prompt + gen_length masks (mask id 5); gen_length % block_length == 0 and steps % blocks
  == 0 are asserted; steps per block = steps // (gen_length // block_length).
- Blocks are aligned from the prompt's first token. With r = prompt_length % block_length != 0,
  the first generated "block" is the block_length - r masks that complete the prompt's last
  aligned block, and the last one is r long.
- The prompt's whole aligned blocks (prefill_length = prompt_length // B * B) are run once,
  keeping their keys/values (not counted in nfe).
- Each block: counts = the block's masks spread over the steps (remainder first). For every
  count > 0: one forward (nfe += 1) of x[block_start:block_end] (block_start = prefill_length
  for the first block, so the prompt's tail is fed again) against the cache, with the
  block-causal mask, at cache positions block_start..block_end-1; then the cache is cropped
  back to block_start (the forward's keys/values are dropped). x0 = argmax of
  (Gumbel-noised) logits; confidence = softmax(logits in float64)[x0] (low_confidence) or
  uniform (random); only masked positions compete. Without a threshold, the top `count` are
  committed; with one, the best always and every other one with confidence >= threshold.
- Once the block has no mask left: if eos_id is set and appears in the block's generated part
  (from max(block_start, prompt_length)), x is cut at the block's end, every position from
  the first such eos on becomes eos, and generation stops. Otherwise one more forward
  (nfe += 1) writes the finished block's keys/values into the cache.
- Returns (x, nfe).

The published code crops the cache with `crop(block_start)`, an absolute length in the
transformers it was written for (`crop_to` here). It builds its mask in bfloat16; in float32
SDPA refuses a mask of another dtype, so the mask here has the network's dtype (same values: 0
and -inf).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaForCausalLM

MASK_ID = 5


def block_causal(length: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, length, length): 0 where the key's block <= the query's block, else -inf."""
    blocks = torch.arange(length) // block
    allowed = blocks[None, :] <= blocks[:, None]
    mask = torch.zeros((length, length), dtype=dtype)
    mask[~allowed] = float("-inf")
    return mask[None, None]


def crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions: what the published `past_key_values.crop(block_start)`
    did in the transformers it was written for (5.25's `crop` takes a negative count instead,
    refuses a positive one and does nothing with 0)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def uniform_counts(masks: int, steps: int) -> list[int]:
    base, extra = divmod(masks, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


class StableDiffcoderForCausalLM(LlamaForCausalLM):
    """The published class's network (a plain Llama) and, re-expressed, its sampler."""

    def _choose(self, logits, mask_here, current, count, threshold, temperature, remasking):
        """Tokens and which positions to commit, for one block. logits (1, b, V)."""
        if temperature > 0:
            noise = torch.rand(logits.shape, dtype=torch.float64)
            scored = logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature
        else:
            scored = logits
        x0 = scored.argmax(dim=-1)  # (1, b)
        if remasking == "low_confidence":
            probs = torch.softmax(logits.to(torch.float64), dim=-1)
            confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
        else:
            confidence = torch.rand(x0.shape)
        x0 = torch.where(mask_here, x0, current)
        confidence = torch.where(mask_here, confidence, torch.tensor(float("-inf"),
                                                                      dtype=confidence.dtype))
        k = int(mask_here.sum()) if threshold is not None else count
        order = torch.topk(confidence[0], k=k).indices
        take = torch.zeros_like(x0, dtype=torch.bool)
        take[0, order] = True
        if threshold is not None:
            for rank in range(1, k):
                if confidence[0, order[rank]] < threshold:
                    take[0, order[rank]] = False
        return x0, take

    @torch.no_grad()
    def generate_block(self, input_ids, steps=128, gen_length=128, block_length=4,
                       temperature=0.0, remasking="low_confidence", mask_id=MASK_ID,
                       threshold=0.95, eos_id=None):
        prompt_length = input_ids.shape[1]
        x = torch.cat([input_ids, torch.full((1, gen_length), mask_id, dtype=torch.long)], 1)
        assert gen_length % block_length == 0
        blocks = gen_length // block_length
        assert steps % blocks == 0
        steps //= blocks
        sizes = [block_length] * blocks
        r = prompt_length % block_length
        if r:
            sizes = [block_length - r] + sizes
            sizes[-1] = r
        full_mask = block_causal(prompt_length + gen_length, block_length, self.dtype)
        cache = DynamicCache()
        nfe = 0
        prefill = prompt_length // block_length * block_length
        if prefill:
            self(x[:, :prefill], past_key_values=cache, use_cache=True,
                 attention_mask=full_mask[..., :prefill, :prefill],
                 cache_position=torch.arange(prefill))
        done = 0
        for index, size in enumerate(sizes):
            start = prompt_length + done if index else prefill
            end = prompt_length + done + size
            done += size
            positions = torch.arange(start, end)
            counts = uniform_counts(int((x[:, start:end] == mask_id).sum()), steps)
            stop = False
            for count in counts:
                if count > 0:
                    nfe += 1
                    here = x[:, start:end] == mask_id
                    logits = self(x[:, start:end], past_key_values=cache, use_cache=True,
                                  attention_mask=full_mask[..., start:end, :end],
                                  cache_position=positions).logits
                    crop_to(cache, start)
                    x0, take = self._choose(logits, here, x[:, start:end], count, threshold,
                                            temperature, remasking)
                    x[:, start:end][take] = x0[take]
                if (x[:, start:end] == mask_id).sum() == 0:
                    generated = max(start, prompt_length)
                    if eos_id is not None and (x[:, generated:end] == eos_id).any():
                        x = x[:, :end]
                        first = int((x[0, generated:end] == eos_id).nonzero()[0]) + generated
                        x[0, first:] = eos_id
                        stop = True
                        break
                    nfe += 1
                    self(x[:, start:end], past_key_values=cache, use_cache=True,
                         attention_mask=full_mask[..., start:end, :end], cache_position=positions)
                    break
            if stop:
                break
        return x, nfe
