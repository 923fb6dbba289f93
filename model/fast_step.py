"""The denoising passes without transformers' per-call overhead, and the hole step as a CUDA graph.

At batch 1, a denoising step that runs the hole's window against its cached context is bound by
reading the weights once (a 7B network in bf16: 14 GB, about 3 ms on an H200). Run through
transformers' modules in eager mode it is bound by the CPU instead: some 1,200 kernels a
step, each launched from Python, around masks and caches built anew on every call. This module
runs the network's own weights in a plain layer loop (`decoder_layer`: the Qwen2 / Llama
layer, written out) over fixed-shape buffers -- the window's ids and positions, every layer's
keys and values with the context padded to a bucket of CONTEXT_BUCKET rows, an additive mask
that hides the padding -- so a hole step has static shapes and no host synchronisation. On
CUDA it is captured once per (window, bucket) as a CUDA graph that later steps replay (one
launch a step; the decode graphs of vLLM and llama.cpp are the same idea), and for networks
from COMPILE_PARAMETERS up the layer is compiled by torch.compile, which fuses its elementwise
work (norms, rotary embedding, SiLU, residual adds) into a few kernels. Full passes and the
document cache's partial pass (`rows_pass`) run the same loop, uncaptured.

It computes what the sampler's passes through transformers compute (tests/test_fast_step.py
compares them on every family's tiny checkpoint; tests/test_cuda.py on the GPU, compiled and
captured). Grouped-query attention runs with each key/value head's query heads stacked along
the query axis, one SDPA call over the unrepeated keys and values (transformers' repeat_kv
would copy the context's keys group-size times a layer).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the network's own

from model.loader import LoadedModel

CONTEXT_BUCKET = 256  # context rows are padded up to a multiple of this: few graphs to capture
MAX_GRAPHS = 8  # captured shapes kept per model (least recently used dropped) ...
MAX_BUFFER_BYTES = 2 << 30  # ... and at most this much in their keys/values buffers
WARM_UP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS picks its kernels)
DISABLE_ENV = "DIFFUSION_LSP_CUDA_GRAPHS"  # "0": every pass runs through transformers
COMPILE_ENV = "DIFFUSION_LSP_COMPILE"  # "0": the decoder layer is not compiled
COMPILE_PARAMETERS = 200_000_000  # torch.compile pays off from about this size (0.5B and up)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
T = TypeVar("T")
log = logging.getLogger(__name__)


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
            and getattr(config, "hidden_act", "silu") == "silu"
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


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, as its modules hold them (biases may be None)."""

    input_norm: torch.Tensor
    q: torch.Tensor
    q_bias: torch.Tensor | None
    k: torch.Tensor
    k_bias: torch.Tensor | None
    v: torch.Tensor
    v_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


def layer_weights(layer: torch.nn.Module) -> LayerWeights:
    attention, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        layer.input_layernorm.weight,
        attention.q_proj.weight, attention.q_proj.bias,
        attention.k_proj.weight, attention.k_proj.bias,
        attention.v_proj.weight, attention.v_proj.bias,
        attention.o_proj.weight, attention.o_proj.bias,
        layer.post_attention_layernorm.weight,
        mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm / LlamaRMSNorm: normalised in float32, scaled in the input's dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def decoder_layer(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                  mask: torch.Tensor | None, weights: LayerWeights, eps: float,
                  scaling: float, heads: int, kv_heads: int) -> torch.Tensor:
    """One Qwen2 / Llama decoder layer (pre-norm attention, then a SwiGLU MLP) over a window.
    hidden (B, W, H); cos, sin (B, W, D); keys, values (B, kv_heads, S, D), the window's rows
    written at `slots`; mask (B, 1, group * W, S) additive, or None (every row visible)."""
    batch, width, _ = hidden.shape
    dim = cos.shape[-1]
    group = heads // kv_heads
    x = rms_norm(hidden, weights.input_norm, eps)
    q = F.linear(x, weights.q, weights.q_bias).view(batch, width, heads, dim).transpose(1, 2)
    k = F.linear(x, weights.k, weights.k_bias).view(batch, width, kv_heads, dim).transpose(1, 2)
    v = F.linear(x, weights.v, weights.v_bias).view(batch, width, kv_heads, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys.index_copy_(2, slots, k)
    values.index_copy_(2, slots, v)
    # query row j * W + w of key/value head g is query head g * group + j at window row w
    q = q.reshape(batch, kv_heads, group * width, dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    out = out.reshape(batch, heads, width, dim).transpose(1, 2).reshape(batch, width,
                                                                        heads * dim)
    hidden = hidden + F.linear(out, weights.o, weights.o_bias)
    x = rms_norm(hidden, weights.post_norm, eps)
    x = F.silu(F.linear(x, weights.gate)) * F.linear(x, weights.up)
    return hidden + F.linear(x, weights.down)


class _Layers:
    """The network's decoder layers as `decoder_layer` calls: weights gathered once, and on
    CUDA, for networks of at least COMPILE_PARAMETERS, the layer compiled by torch.compile
    (its elementwise work -- norms, rotary embedding, SiLU, residuals -- fused into a few
    kernels; every layer shares one compiled graph, the weights being arguments). A compile
    that fails leaves the eager function, once, with a warning."""

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        config = network.config
        layers = network.model.layers
        self.weights = [layer_weights(layer) for layer in layers]
        attention = layers[0].self_attn
        self.eps = float(layers[0].input_layernorm.variance_epsilon)
        self.scaling = float(attention.scaling)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        parameters = sum(p.numel() for p in network.parameters())
        self.function = decoder_layer
        if (device.type == "cuda" and parameters >= COMPILE_PARAMETERS
                and os.environ.get(COMPILE_ENV, "1") != "0"):
            self.function = torch.compile(decoder_layer, fullgraph=True)
        self.compiled = self.function is not decoder_layer

    def __call__(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        args = (hidden, cos, sin, keys, values, slots, mask, self.weights[index], self.eps,
                self.scaling, self.heads, self.kv_heads)
        if self.function is decoder_layer:
            return decoder_layer(*args)
        try:
            return self.function(*args)
        except Exception as error:  # noqa: BLE001 - any compile failure: run it eagerly
            if torch.cuda.is_current_stream_capturing():
                raise
            log.warning("torch.compile of the decoder layer failed; running it eagerly: %s",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            self.function, self.compiled = decoder_layer, False
            return decoder_layer(*args)


def layers_of(network: torch.nn.Module) -> _Layers:
    """The network's `_Layers`, made on first use and kept on the network."""
    layers = getattr(network, "_diffusion_lsp_layers", None)
    if layers is None:
        layers = _Layers(network, next(network.parameters()).device)
        network._diffusion_lsp_layers = layers
    return layers


def window_forward(network: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                   keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """The network over a window of tokens against keys/values already in `keys`/`values`.

    ids, positions: (B, W). keys, values: per layer (B, kv_heads, S, head_dim); the window's
    own keys/values are written into rows `slots` (W,) in place, before attention. mask:
    (B, 1, W, S) additive, or None when every row may see every row. Returns the final-normed
    hidden states (B, W, H), as the model's `last_hidden_state`.
    """
    inner = network.model
    layers = layers_of(network)
    group = layers.heads // layers.kv_heads
    batch, width = ids.shape
    hidden = inner.embed_tokens(ids)  # (B, W, H)
    cos, sin = inner.rotary_emb(hidden, positions)  # (B, W, D) each
    grouped = None
    if mask is not None:
        rows = mask.shape[-1]
        grouped = mask[:, :, None].expand(batch, 1, group, width, rows).reshape(
            batch, 1, group * width, rows)
    for index in range(len(layers.weights)):
        hidden = layers(index, hidden, cos, sin, keys[index], values[index], slots, grouped)
    return inner.norm(hidden)


@torch.inference_mode()
def rows_pass(model: LoadedModel, ids: torch.Tensor, positions: torch.Tensor,
              past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
              ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One pass of tokens `ids` (Q,) at sequence `positions` (Q,) against `past` rows (per
    layer (1, kv_heads, R, D); None: none), every row seeing every row: the sampler's full
    pass (no past) and the document cache's partial pass (model.prompt_cache), without
    transformers' per-call masks and caches. Returns hidden states (Q, H) and every layer's
    keys and values, the past's R rows then the Q new ones."""
    count = ids.numel()
    device = model.device
    if past is None:
        keys, values = kv_buffers(model, 1, count)
        reused = 0
    else:
        reused = past[0][0].shape[-2]

        def grown(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat([rows, rows.new_empty((*rows.shape[:-2], count, rows.shape[-1]))],
                             dim=-2)

        keys, values = [grown(k) for k, _ in past], [grown(v) for _, v in past]
    slots = torch.arange(reused, reused + count, device=device)
    hidden = window_forward(model.network, ids[None].to(device), positions[None].to(device),
                            keys, values, slots, None)
    return hidden[0], list(zip(keys, values, strict=True))


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
            try:
                self._capture(shape)
            except Exception as error:  # noqa: BLE001 - the step still runs, uncaptured
                log.warning("CUDA graph capture failed; hole steps run uncaptured: %s",
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
                self.graphs = False
                shape.hidden = self._forward(shape)
        else:
            shape.graph.replay()
            self.replays += 1
        return shape.hidden[0]

    @property
    def buffer_bytes(self) -> int:
        """Bytes in the kept shapes' keys and values buffers."""
        return sum(t.numel() * t.element_size() for shape in self._shapes.values()
                   for t in (*shape.keys, *shape.values))

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
            while len(self._shapes) > 1 and (len(self._shapes) > MAX_GRAPHS
                                             or self.buffer_bytes > MAX_BUFFER_BYTES):
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
