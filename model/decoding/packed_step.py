"""Several holes' rows as one packed pass: one read of the weights for the batch.

On a GPU a hole step reads every weight once whatever its number of rows, so 16 holes of 65
rows cost little more than one if their rows go through the network together. Padding them to
one (B, W) batch, as transformers' batched forward wants, pads the contexts too: each hole's
cached keys and values copied into a (B, heads, max context, D) tensor every step. Here the
holes' rows are packed into one (1, N) sequence instead (N = the sum of their rows): the
embedding, every projection, the MLP and the norms run on the packed matrix (one matrix
product per weight for the whole batch), and only attention is per hole, each hole's queries
against its own past keys and values and its own rows -- the variable-length batching of
vLLM / FlashAttention's varlen, done with one SDPA call a hole.

A hole's part (`Segment`) is any of the sampler's passes: a hole-only step (its window's rows
against its cached context, `model.decoding.hole.ContextCache`), a full pass (its whole
sequence, no past: a hole that joins the batch, or whose cache is refreshed) or the document
cache's partial pass (the changed rows against the reused ones, `model.decoding.prompt_cache`).
So holes that join and holes that run share one pass (`model.decoding.passes._packed_pass`);
a full or partial pass keeps its keys and values (`Segment.keep`) for its context cache.

Why per-hole SDPA calls: measured on the 2-core CPU (`python -m benchmarks.packed_attention`:
the 0.5B shape's heads, 4 and 16 holes of 17-65 rows over 200-400 context rows; table in
docs/benchmarks.md), one SDPA call a hole was the fastest of per-hole calls, one padded SDPA
with a padding mask, one SDPA over the packed rows with a block-diagonal mask (it computes
every masked pair) and FlexAttention with a document mask, compiled. On a GPU the per-hole
calls cost a kernel launch each per layer: the GPU check re-measures (`concurrent*`), and
FlexAttention's document masks or FlashAttention's varlen are the candidates there; hole-only
steps can also replay a CUDA graph of a bucketed batch (`model.decoding.fast_step.graphs`,
DIFFUSION_LSP_PACKED_GRAPHS).

It computes what `model.decoding.passes` computes through transformers for each hole alone
(tests/test_packed_step.py, every family): a hole's rows see only its own past and rows, so its
result does not depend on what it is packed with. Uncaptured (no CUDA graph: the batch's
shapes change at every join and leave).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the network's own

from model.decoding import fast_step
from model.decoding.fast_step.layer import LayerWeights, rms_norm
from model.decoding.pinned import to_device
from model.network.loader import LoadedModel

PACKED_ENV = "DIFFUSION_LSP_PACKED_STEPS"  # "0": batched hole steps through transformers
FIRST_PASSES_ENV = "DIFFUSION_LSP_PACKED_FIRST_PASSES"  # "0": first passes apart (`first_passes`)
ATTENTION_ENV = "DIFFUSION_LSP_PACKED_ATTENTION"  # how the packed rows attend (ATTENTIONS)
PER_HOLE, FLEX = "per_hole", "flex"
ATTENTIONS = (PER_HOLE, FLEX)  # one SDPA call a hole | FlexAttention with a document mask
# where the packed batch is used by default (`enabled`): measured on the 2-core CPU, the
# packed batch against transformers' padded one (`bench load`: load-qwen2.5-0.5b.json)
DEFAULT_DEVICES = ("cuda", "cpu")


KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv_heads, rows, D) each


class Segment(NamedTuple):
    """One hole's part of a packed pass: token ids (Q,) at sequence `positions` (Q,), against
    its `past` keys and values (per layer (1, kv_heads, R, D); None: none, a full pass); each
    of its rows sees the past and all its rows. `keep`: the pass returns its keys and values
    (the past's R rows, then the Q new ones), for a context cache."""

    ids: torch.Tensor
    positions: torch.Tensor
    past: KeysValues | None
    keep: bool = False


def window_segment(ids: torch.Tensor, start: int, context: KeysValues) -> Segment:
    """A hole-only step's segment: the window's ids (W,) at positions start.. against the
    hole's cached context."""
    return Segment(ids, torch.arange(start, start + ids.numel()), context)


def enabled(model: LoadedModel) -> bool:
    """Whether batched hole steps run packed: for a supported network (`fast_step.supported`)
    on the devices measured to gain, unless DIFFUSION_LSP_PACKED_STEPS says otherwise."""
    value = os.environ.get(PACKED_ENV)
    default = model.device.type in DEFAULT_DEVICES
    return fast_step.parse_switch(PACKED_ENV, value, default) and fast_step.supported(model)


def first_passes(model: LoadedModel) -> bool:
    """Whether the full and partial passes of a packed batch's holes join its packed pass
    (DIFFUSION_LSP_PACKED_FIRST_PASSES, default on; off: they run apart, through transformers'
    padded batch as before)."""
    return (enabled(model)
            and fast_step.parse_switch(FIRST_PASSES_ENV, os.environ.get(FIRST_PASSES_ENV), True))


def attention_kind() -> str:
    """The packed attention in force (DIFFUSION_LSP_PACKED_ATTENTION; default per-hole SDPA,
    the fastest measured on a CPU; the GPU check measures both)."""
    value = (os.environ.get(ATTENTION_ENV) or PER_HOLE).strip().lower()
    return value if value in ATTENTIONS else PER_HOLE


class DocumentMask:
    """FlexAttention's block mask of one packed step: query row r of hole i sees key rows of
    hole i only (its context, then its window); keys packed [context_0, window_0, context_1,
    ...]. Made once a step, shared by every layer."""

    _compiled: dict[str, object] = {}  # by device type

    def __init__(self, spans: Sequence[tuple[int, int]], contexts: Sequence[int],
                 device: torch.device) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        queries = torch.cat([torch.full((width,), hole, dtype=torch.int32)
                             for hole, (_, width) in enumerate(spans)]).to(device)
        keys = torch.cat([torch.full((rows + width,), hole, dtype=torch.int32)
                          for hole, ((_, width), rows) in enumerate(
                              zip(spans, contexts, strict=True))]).to(device)

        def same_hole(batch, head, query, key):  # noqa: ANN001, ANN202 - FlexAttention's
            return queries[query] == keys[key]

        self.block_mask = create_block_mask(same_hole, None, None, queries.numel(),
                                            keys.numel(), device=device)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 scaling: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        kind = q.device.type
        if kind not in DocumentMask._compiled:  # eager FlexAttention is a slow reference
            # dynamic shapes on CUDA (the batch changes every step); on a CPU torch 2.13's
            # inductor emits C++ that does not compile for a dynamic FlexAttention
            DocumentMask._compiled[kind] = torch.compile(flex_attention,
                                                         dynamic=kind == "cuda")
        return DocumentMask._compiled[kind](q, keys, values, block_mask=self.block_mask,
                                            scale=scaling, enable_gqa=True)


def packed_attention(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, spans: Sequence[tuple[int, int]],
                     pasts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                     weights: LayerWeights, scaling: float, heads: int,
                     kv_heads: int, document: DocumentMask | None = None
                     ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """hidden plus the attention's output over packed rows: q (1, N, heads * D), k, v
    (1, N, kv_heads * D); each span (offset, width) of rows attends to its own past keys and
    values (1, kv_heads, R_i, D; None: none) and its own rows, nothing else: one SDPA call a
    hole, or with a `document` mask one FlexAttention call over all holes' keys packed. Also
    returns each span's keys and values (its past's rows, then its own)."""
    _, rows, _ = hidden.shape
    dim = cos.shape[-1]
    group = heads // kv_heads
    q = q.view(1, rows, heads, dim).transpose(1, 2)
    k = k.view(1, rows, kv_heads, dim).transpose(1, 2)
    v = v.view(1, rows, kv_heads, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    seen = []  # (1, kv_heads, R_i + W_i, D) keys and values of each span
    for (offset, width), past in zip(spans, pasts, strict=True):
        own = k[:, :, offset:offset + width], v[:, :, offset:offset + width]
        seen.append(own if past is None else (torch.cat([past[0], own[0]], dim=-2),
                                              torch.cat([past[1], own[1]], dim=-2)))
    if document is not None:
        keys = torch.cat([keys for keys, _ in seen], dim=-2)
        values = torch.cat([values for _, values in seen], dim=-2)
        out = document(q, keys, values, scaling).transpose(1, 2).reshape(1, rows, heads * dim)
        return hidden + F.linear(out, weights.o, weights.o_bias), seen
    outputs = []
    for (offset, width), (keys, values) in zip(spans, seen, strict=True):
        # query row j * W + w of key/value head g is query head g * group + j (as fast_step)
        query = q[:, :, offset:offset + width].reshape(1, kv_heads, group * width, dim)
        out = F.scaled_dot_product_attention(query, keys, values, scale=scaling)
        outputs.append(out.reshape(1, heads, width, dim))
    out = torch.cat(outputs, dim=2).transpose(1, 2).reshape(1, rows, heads * dim)
    return hidden + F.linear(out, weights.o, weights.o_bias), seen


def packed_layer(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 spans: Sequence[tuple[int, int]],
                 pasts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                 weights: LayerWeights, eps: float, scaling: float, heads: int, kv_heads: int,
                 document: DocumentMask | None = None
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`fast_step.decoder_layer` over packed rows (1, N, H): projections and MLP on all rows
    at once (fused ones where the weights are fused), attention per span. Also returns each
    span's keys and values (`packed_attention`)."""
    dim = cos.shape[-1]
    x = rms_norm(hidden, weights.input_norm, eps)
    if weights.qkv is not None:
        q, k, v = F.linear(x, weights.qkv, weights.qkv_bias).split(
            [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    else:
        q = F.linear(x, weights.q, weights.q_bias)
        k = F.linear(x, weights.k, weights.k_bias)
        v = F.linear(x, weights.v, weights.v_bias)
    hidden, seen = packed_attention(hidden, q, k, v, cos, sin, spans, pasts, weights, scaling,
                                    heads, kv_heads, document)
    x = rms_norm(hidden, weights.post_norm, eps)
    if weights.gate_up is not None:
        gate, up = F.linear(x, weights.gate_up).chunk(2, dim=-1)
    else:
        gate, up = F.linear(x, weights.gate), F.linear(x, weights.up)
    return hidden + F.linear(F.silu(gate) * up, weights.down), seen


@torch.inference_mode()
def packed_pass(model: LoadedModel, segments: Sequence[Segment], fused: bool = False
                ) -> tuple[list[torch.Tensor], list[KeysValues | None]]:
    """The hidden states (Q_i, H) of every segment against its own past, in one packed pass
    (the final norm applied, as the model's `last_hidden_state`), and for each segment that
    `keep`s them its keys and values per layer (the past's rows, then its own; else None).
    `fused`: through the fused projections (`fast_step.fuse_projections`)."""
    network = model.network
    inner = network.model
    layers = fast_step.layers_of(network)
    if fused:
        layers.fuse()
    stack = layers.fused_weights if fused else layers.weights
    widths = [segment.ids.numel() for segment in segments]
    offsets = [sum(widths[:index]) for index in range(len(widths))]
    spans = list(zip(offsets, widths, strict=True))
    ids = torch.cat([segment.ids for segment in segments])  # (N,)
    positions = torch.cat([segment.positions for segment in segments])  # (N,)
    hidden = inner.embed_tokens(to_device(ids[None], model.device))  # (1, N, H)
    cos, sin = inner.rotary_emb(hidden, to_device(positions[None], model.device))  # (1, N, D)
    document = None
    if attention_kind() == FLEX:
        document = DocumentMask(spans, [0 if s.past is None else s.past[0][0].shape[-2]
                                        for s in segments], model.device)
    kept: list[KeysValues | None] = [[] if segment.keep else None for segment in segments]
    for index, weights in enumerate(stack):
        hidden, seen = packed_layer(
            hidden, cos, sin, spans,
            [None if segment.past is None else segment.past[index] for segment in segments],
            weights, layers.eps, layers.scaling, layers.heads, layers.kv_heads, document)
        for rows, layer in zip(kept, seen, strict=True):
            if rows is not None:
                rows.append(layer)
    hidden = inner.norm(hidden)[0]  # (N, H)
    return list(hidden.split(widths)), kept
