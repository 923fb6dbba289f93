"""The hole-only step at a fixed shape, replayed as a CUDA graph.

At batch 1, a denoising step that runs the hole's window against its cached context is bound by
reading the weights once (a 7B network in bf16: 15 GB, about 3.5 ms on an H200). Run through
transformers' modules in eager mode it is bound by the CPU instead: some 800 kernels a step,
each launched from Python, around masks and caches built anew on every call. This module runs
the same modules (norms, projections, MLPs, rotary embedding) in its own layer loop over
fixed-shape buffers -- the window's ids and positions, every layer's keys and values with the
context padded to a bucket of CONTEXT_BUCKET rows, an additive mask that hides the padding --
so a step has static shapes and no host synchronisation. On CUDA it is captured once per
(window, bucket) as a CUDA graph and later steps replay it (PyTorch's CUDA graphs: one launch
a step instead of hundreds; the decode graphs of vLLM and llama.cpp are the same idea).

It computes what `model.sampler`'s hole-only pass computes (tests/test_fast_step.py compares
them on every family's tiny checkpoint). Grouped-query attention runs with each key/value
head's query heads stacked along the query axis, one SDPA call over the unrepeated keys and
values (transformers' repeat_kv would copy the context's keys group-size times a layer).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the network's own

from model.loader import LoadedModel

CONTEXT_BUCKET = 256  # context rows are padded up to a multiple of this: few graphs to capture
MAX_GRAPHS = 8  # captured shapes kept per model (least recently used dropped)
WARM_UP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS picks its kernels)
DISABLE_ENV = "DIFFUSION_LSP_CUDA_GRAPHS"  # "0": hole steps run through transformers as before
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
T = TypeVar("T")


def supported(model: LoadedModel) -> bool:
    """Whether the network is the stock Qwen2 / Llama stack this loop mirrors (no sliding
    window, no per-head norms)."""
    layers = getattr(model.network.model, "layers", None)
    if not layers:
        return False
    attention = layers[0].self_attn
    config = model.network.config
    return (all(hasattr(attention, name) for name in ATTENTION)
            and not hasattr(attention, "q_norm")
            and not getattr(config, "use_sliding_window", False))


def enabled(model: LoadedModel) -> bool:
    """Hole steps go through `HoleSteps` on CUDA for a supported network, unless turned off."""
    return (model.device.type == "cuda" and os.environ.get(DISABLE_ENV, "1") != "0"
            and supported(model))


def bucket(rows: int) -> int:
    """Context rows rounded up to the next multiple of CONTEXT_BUCKET (at least one bucket)."""
    return max(CONTEXT_BUCKET, -(-rows // CONTEXT_BUCKET) * CONTEXT_BUCKET)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(…, S) bool -> 0 where visible, the dtype's lowest value elsewhere (as transformers)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min)


def window_forward(network: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                   keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """The network over a window of tokens against keys/values already in `keys`/`values`.

    ids, positions: (B, W). keys, values: per layer (B, kv_heads, S, head_dim); the window's
    own keys/values are written into rows `slots` (W,) in place, before attention. mask:
    (B, 1, W, S) additive. Returns the final-normed hidden states (B, W, H), as the model's
    `last_hidden_state`.
    """
    inner, config = network.model, network.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv_heads
    batch, width = ids.shape
    hidden = inner.embed_tokens(ids)  # (B, W, H)
    cos, sin = inner.rotary_emb(hidden, positions)  # (B, W, D) each
    rows = mask.shape[-1]
    # query row j * W + w of key/value head g is query head g * group + j at window row w
    grouped_mask = mask[:, :, None].expand(batch, 1, group, width, rows).reshape(
        batch, 1, group * width, rows)
    for index, layer in enumerate(inner.layers):
        attention = layer.self_attn
        dim = attention.head_dim
        x = layer.input_layernorm(hidden)
        q = attention.q_proj(x).view(batch, width, heads, dim).transpose(1, 2)
        k = attention.k_proj(x).view(batch, width, kv_heads, dim).transpose(1, 2)
        v = attention.v_proj(x).view(batch, width, kv_heads, dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys[index].index_copy_(2, slots, k)
        values[index].index_copy_(2, slots, v)
        q = q.reshape(batch, kv_heads, group * width, dim)
        out = F.scaled_dot_product_attention(q, keys[index], values[index],
                                             attn_mask=grouped_mask, scale=attention.scaling)
        out = out.view(batch, heads, width, dim).transpose(1, 2).reshape(batch, width,
                                                                         heads * dim)
        hidden = hidden + attention.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return inner.norm(hidden)


def kv_buffers(model: LoadedModel, batch: int, rows: int) -> tuple[list[torch.Tensor],
                                                                     list[torch.Tensor]]:
    """Zeroed keys and values, per layer (batch, kv_heads, rows, head_dim)."""
    config = model.network.config
    layers = model.network.model.layers
    dim = layers[0].self_attn.head_dim
    shape = (batch, config.num_key_value_heads, rows, dim)

    def make() -> list[torch.Tensor]:
        return [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in layers]

    return make(), make()


@dataclass
class _Shape:
    """The static buffers of one (window, context bucket) and, on CUDA, its captured graph.
    Rows [0, bucket) hold the context (padding after it masked out), [bucket, bucket + W) the
    window."""

    ids: torch.Tensor  # (1, W)
    positions: torch.Tensor  # (1, W)
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    slots: torch.Tensor  # (W,) = bucket .. bucket + W - 1
    mask: torch.Tensor  # (1, 1, W, bucket + W)
    context: object | None = None  # the ContextCache whose rows the buffers hold
    hidden: torch.Tensor | None = None  # (1, W, H), the last step's output
    graph: torch.cuda.CUDAGraph | None = None


class HoleSteps:
    """Hole-only passes of one hole at a time through fixed-shape buffers (a CUDA graph each
    on CUDA; eager elsewhere, which tests use). Used from the engine's one thread."""

    def __init__(self, model: LoadedModel, graphs: bool | None = None) -> None:
        self.model = model
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self._shapes: OrderedDict[tuple[int, int], _Shape] = OrderedDict()
        self.captures = 0
        self.replays = 0

    @torch.inference_mode()
    def run(self, context_layers: list[tuple[torch.Tensor, torch.Tensor]], context: object,
            window_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Hidden states (W, H) of the window `window_ids` (W,) at sequence positions start..,
        against `context_layers` (per layer (1, kv_heads, C, D)); `context` is their owner,
        whose identity says when the buffers must be refilled."""
        width = window_ids.numel()
        rows = context_layers[0][0].shape[-2]
        shape = self._shape(width, bucket(rows))
        if shape.context is not context:
            self._load_context(shape, context_layers, rows)
            shape.context = context
        shape.ids.copy_(window_ids[None])
        shape.positions.copy_(torch.arange(start, start + width)[None])
        if not self.graphs:
            shape.hidden = self._forward(shape)
        elif shape.graph is None:
            self._capture(shape)
        else:
            shape.graph.replay()
            self.replays += 1
        return shape.hidden[0]

    def _shape(self, width: int, rows: int) -> _Shape:
        key = (width, rows)
        shape = self._shapes.get(key)
        if shape is None:
            device = self.model.device
            keys, values = kv_buffers(self.model, 1, rows + width)
            shape = _Shape(
                ids=torch.zeros((1, width), dtype=torch.long, device=device),
                positions=torch.zeros((1, width), dtype=torch.long, device=device),
                keys=keys, values=values,
                slots=torch.arange(rows, rows + width, device=device),
                mask=torch.zeros((1, 1, width, rows + width), dtype=self.model.dtype,
                                 device=device))
            self._shapes[key] = shape
            while len(self._shapes) > MAX_GRAPHS:
                self._shapes.popitem(last=False)
        self._shapes.move_to_end(key)
        return shape

    def _load_context(self, shape: _Shape, layers: list[tuple[torch.Tensor, torch.Tensor]],
                      rows: int) -> None:
        for index, (keys, values) in enumerate(layers):
            shape.keys[index][..., :rows, :].copy_(keys)
            shape.values[index][..., :rows, :].copy_(values)
        columns = torch.arange(shape.mask.shape[-1], device=shape.mask.device)
        visible = (columns < rows) | (columns >= shape.slots[0])  # the context, the window
        shape.mask.copy_(additive_mask(visible, shape.mask.dtype).expand_as(shape.mask))

    def _forward(self, shape: _Shape) -> torch.Tensor:
        return window_forward(self.model.network, shape.ids, shape.positions, shape.keys,
                              shape.values, shape.slots, shape.mask)

    def _capture(self, shape: _Shape) -> None:
        shape.graph, shape.hidden = capture(lambda: self._forward(shape), self.model.device)
        self.captures += 1


def capture(run: Callable[[], T], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T]:
    """`run` captured as a CUDA graph, and its output (static: every replay rewrites it).
    Warmed up on a side stream first (cuBLAS picks its kernels, lazy state is made); the
    graph is replayed once, since a capture records kernels without running them."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARM_UP_RUNS):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()
    graph.replay()
    return graph, output


def hole_steps(model: LoadedModel) -> HoleSteps:
    """The model's HoleSteps, made on first use."""
    if model.hole_steps is None:
        model.hole_steps = HoleSteps(model)
    return model.hole_steps
