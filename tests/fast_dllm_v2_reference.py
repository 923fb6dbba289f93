"""Fast-dLLM v2's published network (inference path) and `generate`, re-expressed for the tests.

Source: the `modeling.py` shipped with Efficient-Large-Model/Fast_dLLM_v2_7B (and _1.5B), NVlabs
Fast-dLLM v2, Apache-2.0 (read as copied in Satgoy152/DualDiffusion
FastDLLM_inferencing/Fast_dLLM_v2_7B/modeling.py, leaving out that copy's step hook and logits
history; its denoising step is NVlabs Fast-dLLM v2/generation_functions.py `batch_sample`'s,
whose stop rule differs). Facts, not code, were carried over;
every rule below is written from the published one, in its order:

- network: Qwen2 (q/k/v bias, RoPE, RMSNorm, SwiGLU); at inference the attention is SDPA under
  the boolean mask `eval_block_diff_mask`: query position q may see key position k when
  q // block_size >= k // block_size (positions counted from the cache's first row), with the
  cache's keys concatenated in front; the forward's `block_size` defaults to 32, and `generate`
  passes its own only to the cache-writing forwards (the denoising forwards use the default).
- `generate(input_ids, max_new_tokens, mask_id=151665, threshold=1, small_block_size=8,
  block_size=32, stop_token=151645, temperature=0, use_block_cache=False)`, greedy, one row.
  Only that path is re-expressed (no sampling, no sub-block cache); `nfe` counts forwards.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FastDllmV2Reference:
    """The published network's inference forward over a checkpoint's weights (float32)."""

    def __init__(self, directory, config: dict):
        self.config = SimpleNamespace(**config)  # config.json as the published class reads it
        self.w = {k: v.float() for k, v in load_file(str(directory / "model.safetensors")).items()}
        if "lm_head.weight" not in self.w:  # tied (the 1.5B)
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        c = self.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.inv_freq = 1.0 / (c.rope_theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))

    def forward(self, ids: torch.Tensor, cache: list | None, write: bool,
                block_size: int = 32) -> tuple[torch.Tensor, list | None]:
        """ids (1, Q) at positions len(cache).. ; returns logits (1, Q, V) and the cache (the
        new rows appended when `write`, else unchanged)."""
        c, w = self.config, self.w
        past = cache[0][0].shape[2] if cache else 0
        q_len = ids.shape[1]
        positions = torch.arange(past, past + q_len)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q_idx = torch.arange(q_len) + past
        k_idx = torch.arange(q_len + past)
        mask = (q_idx[:, None] // block_size) >= (k_idx[None, :] // block_size)  # eval mask
        h = w["model.embed_tokens.weight"][ids]
        new_cache = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            x = _rms(h, w[p + "input_layernorm.weight"], c.rms_norm_eps)

            def proj(name, heads, x=x, p=p):
                y = x @ w[p + f"self_attn.{name}.weight"].T + w[p + f"self_attn.{name}.bias"]
                return y.view(1, q_len, heads, self.head_dim).transpose(1, 2)
            q, k, v = proj("q_proj", self.heads), proj("k_proj", self.kv_heads), \
                proj("v_proj", self.kv_heads)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if cache:
                k = torch.cat((cache[i][0], k), dim=2)
                v = torch.cat((cache[i][1], v), dim=2)
            new_cache.append((k, v))
            rep = self.heads // self.kv_heads
            attn = F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                attn_mask=mask[None, None], scale=self.head_dim ** -0.5)
            attn = attn.transpose(1, 2).reshape(1, q_len, -1)
            h = h + attn @ w[p + "self_attn.o_proj.weight"].T
            x = _rms(h, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            gate = F.silu(x @ w[p + "mlp.gate_proj.weight"].T)
            h = h + (gate * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        h = _rms(h, w["model.norm.weight"], c.rms_norm_eps)
        logits = h @ w["lm_head.weight"].T
        return logits, (new_cache if write else cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, mask_id: int = 151665,
                 threshold: float = 1, small_block_size: int = 8, block_size: int = 32,
                 stop_token: int = 151645) -> tuple[torch.Tensor, int]:
        """The published greedy `generate` (use_block_cache False); returns (ids, nfe)."""
        nfe = 0
        num_blocks = max_new_tokens // block_size
        original_input_length = input_ids.shape[1]
        cache = None
        if input_ids.shape[1] > block_size:  # prefill whole blocks of the prompt
            logits, cache = self.forward(
                input_ids[:, :input_ids.shape[1] // block_size * block_size], None, True,
                block_size)
            nfe += 1
            if input_ids.shape[1] % block_size == 0:
                input_ids = torch.cat([input_ids, logits[:, -1:].argmax(-1)], dim=1)
        num_small_blocks = block_size // small_block_size

        def stopped(x_t, prompt_length):
            if stop_token in x_t[:, prompt_length:]:
                first = (x_t[:, prompt_length:] == stop_token).nonzero()[0][1]
                return (x_t[:, prompt_length:prompt_length + first] == mask_id).sum() == 0
            return False

        for _ in range(num_blocks):
            if stop_token in input_ids[:, original_input_length:]:
                break
            prompt_length = input_ids.shape[1]
            x_t = torch.cat([input_ids, torch.full(
                (1, block_size - prompt_length % block_size), mask_id, dtype=torch.long)], dim=1)
            while True:
                if stopped(x_t, prompt_length):
                    break
                mask_idx = x_t[:, -block_size:] == mask_id
                if mask_idx.sum() == 0:  # the block is done: write it, take the next token
                    logits, cache = self.forward(x_t[:, -block_size:], cache, True, block_size)
                    nfe += 1
                    x_t = torch.cat([x_t, logits[:, -1:].argmax(-1)], dim=1)
                    break
                for small in range(num_small_blocks):
                    start = -block_size + small * small_block_size
                    stop = small * small_block_size + small_block_size
                    end = None if stop == block_size else -block_size + stop
                    while True:
                        mask_idx = x_t[:, -block_size:] == mask_id
                        if mask_idx[:, start:end].sum() == 0:
                            break
                        if stopped(x_t, prompt_length):
                            break
                        logits, _ = self.forward(x_t[:, -block_size:], cache, False)  # 32-mask
                        nfe += 1
                        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)[:, start:end]
                        p_1t = torch.softmax(logits, dim=-1)
                        x_1 = p_1t.argmax(dim=-1)
                        x1_p = torch.gather(p_1t, -1, x_1[..., None])[..., 0]
                        x1_p = torch.where(mask_idx[:, start:end], x1_p, -torch.inf)
                        unmask = x1_p > threshold
                        unmask[0, x1_p.argmax(dim=-1)[0]] = True
                        unmask = unmask & mask_idx[:, start:end]
                        x_t[:, start:end][unmask] = x_1[unmask]
            input_ids = x_t
        if stop_token in input_ids[:, original_input_length:]:
            first = (input_ids[:, original_input_length:] == stop_token).nonzero()[0][1]
            input_ids = input_ids[:, :first + original_input_length + 1]
        return input_ids, nfe
