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
document cache's partial pass (`rows_pass`) run the same loop, uncaptured. A step's inputs
reach the GPU through pinned memory, queued without a host sync (`model.decoding.pinned`).

Three switches, each an environment variable (`Switches`; 1 / 0, unset: off; on CUDA only):
- DIFFUSION_LSP_GRAPH_HEAD: a greedy hole step runs its LM head (over the hole's rows only)
  and its scoring (`model.decoding.scoring.greedy_scores`) inside the captured graph too; the step
  returns each position's token and confidence, and the one host sync is that (2, n) copy.
- DIFFUSION_LSP_FUSED_PROJECTIONS: q/k/v in one matrix product and gate/up in one
  (`fuse_projections`: the modules' weights become views of the fused ones, so nothing is held
  twice; the same numbers up to the matrix products' rounding).
- DIFFUSION_LSP_GRAPH_PASSES: full and partial passes are captured too, on static shapes: the
  queries padded to a multiple of QUERY_BUCKET, the reused context to CONTEXT_BUCKET, at most
  MAX_PASS_ROWS rows in all (longer passes run uncaptured).

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
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the network's own

from model.decoding.pinned import to_device, upload
from model.decoding.scoring import Head, greedy_scores
from model.network import quantize
from model.network.loader import LoadedModel

CONTEXT_BUCKET = 256  # context rows are padded up to a multiple of this: few graphs to capture
QUERY_BUCKET = 64  # a captured pass's queries are padded up to a multiple of this ...
MAX_PASS_ROWS = 1024  # ... and it is captured only when queries and context fit in this
MAX_GRAPHS = 16  # captured shapes kept per model (least recently used dropped) ...
MAX_BUFFER_BYTES = 2 << 30  # ... and at most this much in their keys/values buffers
WARM_UP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS picks its kernels)
DISABLE_ENV = "DIFFUSION_LSP_CUDA_GRAPHS"  # "0": every pass runs through transformers
COMPILE_ENV = "DIFFUSION_LSP_COMPILE"  # "0": the decoder layer is not compiled
GRAPH_HEAD_ENV = "DIFFUSION_LSP_GRAPH_HEAD"  # "1": LM head and greedy scoring in the graph
FUSED_PROJECTIONS_ENV = "DIFFUSION_LSP_FUSED_PROJECTIONS"  # "1": q/k/v and gate/up fused
GRAPH_PASSES_ENV = "DIFFUSION_LSP_GRAPH_PASSES"  # "1": full and partial passes captured too
SWITCH_VALUES = {"1": True, "on": True, "true": True, "yes": True,
                 "0": False, "off": False, "false": False, "no": False}
COMPILE_PARAMETERS = 200_000_000  # torch.compile pays off from about this size (0.5B and up)
RECOMPILE_LIMIT = 32  # compiled variants of the layer allowed (`allow_recompiles`)
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


class Switches(NamedTuple):
    """Which optional parts of the fast step are on (see the module's docstring)."""

    graph_head: bool = False
    fused_projections: bool = False
    graph_passes: bool = False


SWITCH_ENVS = {"graph_head": GRAPH_HEAD_ENV, "fused_projections": FUSED_PROJECTIONS_ENV,
               "graph_passes": GRAPH_PASSES_ENV}
_warned: set[tuple[str, str]] = set()


def parse_switch(name: str, value: str | None, default: bool = False) -> bool:
    """A switch's environment value: 1 / on / true / yes, 0 / off / false / no; unset or
    empty: `default`. Anything else is logged once and leaves the default."""
    if value is None or not value.strip():
        return default
    known = SWITCH_VALUES.get(value.strip().lower())
    if known is None:
        if (name, value) not in _warned:
            _warned.add((name, value))
            log.warning("%s=%r is not a switch value (known: %s); it stays %s", name, value,
                        ", ".join(SWITCH_VALUES), "on" if default else "off")
        return default
    return known


def switches(model: LoadedModel) -> Switches:
    """The switches in force for `model`: read from the environment on every call (so a
    benchmark can flip them between holes), all off where the fast step does not run. Fused
    projections stay off for quantized weights (model.network.quantize: each projection is its own
    packed tensor and kernel; stacking them would unpack them), said once."""
    if not enabled(model):
        return Switches()
    on = Switches(**{field: parse_switch(env, os.environ.get(env))
                     for field, env in SWITCH_ENVS.items()})
    if on.fused_projections and model.quantization != quantize.NONE:
        if (FUSED_PROJECTIONS_ENV, model.quantization) not in _warned:
            _warned.add((FUSED_PROJECTIONS_ENV, model.quantization))
            log.warning("%s is ignored for %s weights: quantized projections are not fused",
                        FUSED_PROJECTIONS_ENV, model.quantization)
        on = on._replace(fused_projections=False)
    return on


def round_up(rows: int, multiple: int) -> int:
    """`rows` rounded up to a multiple of `multiple`, at least one multiple."""
    return max(multiple, -(-rows // multiple) * multiple)


def bucket(rows: int) -> int:
    """Context rows rounded up to the next multiple of CONTEXT_BUCKET (at least one bucket)."""
    return round_up(rows, CONTEXT_BUCKET)


def pass_shape(queries: int, reused: int) -> tuple[int, int] | None:
    """(padded queries, context rows) of a captured pass of `queries` new tokens against
    `reused` rows (0: a full pass); None when that is over MAX_PASS_ROWS (it runs uncaptured)."""
    padded = round_up(queries, QUERY_BUCKET)
    context = bucket(reused) if reused else 0
    return (padded, context) if padded + context <= MAX_PASS_ROWS else None


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(…, S) bool -> 0 where visible, the dtype's lowest value elsewhere (as transformers)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min)


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, as its modules hold them (biases may be None). The fused
    set (`_Layers.fuse`) has qkv, qkv_bias and gate_up instead of q, k, v, their biases, gate
    and up (None there: a compiled layer gets no two arguments sharing memory)."""

    input_norm: torch.Tensor
    q: torch.Tensor | None
    q_bias: torch.Tensor | None
    k: torch.Tensor | None
    k_bias: torch.Tensor | None
    v: torch.Tensor | None
    v_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate: torch.Tensor | None
    up: torch.Tensor | None
    down: torch.Tensor
    qkv: torch.Tensor | None = None  # q, k, v stacked (`fuse_projections`)
    qkv_bias: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None  # gate, up stacked


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


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight stacking `linears`' along the output axis (and one bias, where they have
    biases); each module's weight and bias become views of their rows, so the network holds
    every value once and its modules compute as before. Returns (weight, bias or None)."""
    # ordinary tensors (usable outside inference mode), no autograd history
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears])
        biases = [linear.bias for linear in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else linear.weight.new_zeros(
                linear.weight.shape[0]) for b, linear in zip(biases, linears, strict=True)])
        row = 0
        for linear in linears:
            rows = linear.weight.shape[0]
            linear.weight = nn.Parameter(weight[row:row + rows],
                                         requires_grad=linear.weight.requires_grad)
            if linear.bias is not None:
                linear.bias = nn.Parameter(bias[row:row + rows],
                                           requires_grad=linear.bias.requires_grad)
            row += rows
    return weight, bias


def fuse_projections(network: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None,
                                                        torch.Tensor]]:
    """Every layer's q/k/v projections stacked into one weight and gate/up into one
    (`fuse_linears`), for one matrix product each instead of three and two. Returns per layer
    (qkv, qkv bias or None, gate_up)."""
    fused = []
    for layer in network.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up, _ = fuse_linears([mlp.gate_proj, mlp.up_proj])
        fused.append((qkv, qkv_bias, gate_up))
    return fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm / LlamaRMSNorm: normalised in float32, scaled in the input's dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def attention(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              slots: torch.Tensor, mask: torch.Tensor | None, weights: LayerWeights,
              scaling: float, heads: int, kv_heads: int) -> torch.Tensor:
    """hidden plus the attention's output, from the window's projections q (B, W, heads * D),
    k, v (B, W, kv_heads * D); keys, values, slots and mask as `decoder_layer`'s."""
    batch, width, _ = hidden.shape
    dim = cos.shape[-1]
    group = heads // kv_heads
    q = q.view(batch, width, heads, dim).transpose(1, 2)
    k = k.view(batch, width, kv_heads, dim).transpose(1, 2)
    v = v.view(batch, width, kv_heads, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys.index_copy_(2, slots, k)
    values.index_copy_(2, slots, v)
    # query row j * W + w of key/value head g is query head g * group + j at window row w
    q = q.reshape(batch, kv_heads, group * width, dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    out = out.reshape(batch, heads, width, dim).transpose(1, 2).reshape(batch, width,
                                                                        heads * dim)
    return hidden + F.linear(out, weights.o, weights.o_bias)


def decoder_layer(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                  mask: torch.Tensor | None, weights: LayerWeights, eps: float,
                  scaling: float, heads: int, kv_heads: int) -> torch.Tensor:
    """One Qwen2 / Llama decoder layer (pre-norm attention, then a SwiGLU MLP) over a window.
    hidden (B, W, H); cos, sin (B, W, D); keys, values (B, kv_heads, S, D), the window's rows
    written at `slots`; mask (B, 1, group * W, S) additive, or None (every row visible)."""
    x = rms_norm(hidden, weights.input_norm, eps)
    q = F.linear(x, weights.q, weights.q_bias)
    k = F.linear(x, weights.k, weights.k_bias)
    v = F.linear(x, weights.v, weights.v_bias)
    hidden = attention(hidden, q, k, v, cos, sin, keys, values, slots, mask, weights, scaling,
                       heads, kv_heads)
    x = rms_norm(hidden, weights.post_norm, eps)
    x = F.silu(F.linear(x, weights.gate)) * F.linear(x, weights.up)
    return hidden + F.linear(x, weights.down)


def fused_decoder_layer(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                        mask: torch.Tensor | None, weights: LayerWeights, eps: float,
                        scaling: float, heads: int, kv_heads: int) -> torch.Tensor:
    """`decoder_layer` with the projections fused (`fuse_projections`): q/k/v one matrix
    product, gate/up one. Its own function, so torch.compile keeps its variants apart."""
    dim = cos.shape[-1]
    x = rms_norm(hidden, weights.input_norm, eps)
    q, k, v = F.linear(x, weights.qkv, weights.qkv_bias).split(
        [heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    hidden = attention(hidden, q, k, v, cos, sin, keys, values, slots, mask, weights, scaling,
                       heads, kv_heads)
    x = rms_norm(hidden, weights.post_norm, eps)
    gate, up = F.linear(x, weights.gate_up).chunk(2, dim=-1)
    return hidden + F.linear(F.silu(gate) * up, weights.down)


class _Layers:
    """The network's decoder layers as `decoder_layer` calls: weights gathered once, and on
    CUDA, for networks of at least COMPILE_PARAMETERS, the layer compiled by torch.compile
    (its elementwise work -- norms, rotary embedding, SiLU, residuals -- fused into a few
    kernels; every layer shares one compiled graph, the weights being arguments). A compile
    that fails leaves the eager function, once, with a warning. With the projections fused
    (`fuse`), `fused_decoder_layer` runs instead, compiled alike."""

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        config = network.config
        layers = network.model.layers
        self.network = network
        self.weights = [layer_weights(layer) for layer in layers]
        self.fused_weights: list[LayerWeights] | None = None
        self.generation = 0  # how often the weights moved (`fuse`): older graphs are stale
        attention = layers[0].self_attn
        self.eps = float(layers[0].input_layernorm.variance_epsilon)
        self.scaling = float(attention.scaling)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        parameters = sum(p.numel() for p in network.parameters())
        self.function, self.fused_function = decoder_layer, fused_decoder_layer
        if (device.type == "cuda" and parameters >= COMPILE_PARAMETERS
                and os.environ.get(COMPILE_ENV, "1") != "0"):
            allow_recompiles()
            self.function = torch.compile(decoder_layer, fullgraph=True)
            self.fused_function = torch.compile(fused_decoder_layer, fullgraph=True)

    @property
    def compiled(self) -> bool:
        return self.function is not decoder_layer

    def fuse(self) -> None:
        """Fuse the network's projections (`fuse_projections`), once. The weights move: the
        generation goes up, so graphs captured over the old ones are dropped
        (`HoleSteps`)."""
        if self.fused_weights is not None:
            return
        if quantize.is_quantized(self.network.model.layers[0].self_attn.q_proj.weight):
            raise ValueError("quantized projections cannot be fused (see `switches`)")
        fused = fuse_projections(self.network)
        self.weights = [layer_weights(layer) for layer in self.network.model.layers]
        self.fused_weights = [
            weights._replace(q=None, q_bias=None, k=None, k_bias=None, v=None, v_bias=None,
                             gate=None, up=None, qkv=qkv, qkv_bias=qkv_bias, gate_up=gate_up)
            for weights, (qkv, qkv_bias, gate_up) in zip(self.weights, fused, strict=True)]
        self.generation += 1

    def __call__(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                 mask: torch.Tensor | None, fused: bool = False) -> torch.Tensor:
        if fused:
            self.fuse()
        eager = fused_decoder_layer if fused else decoder_layer
        function = self.fused_function if fused else self.function
        weights = (self.fused_weights if fused else self.weights)[index]
        args = (hidden, cos, sin, keys, values, slots, mask, weights, self.eps,
                self.scaling, self.heads, self.kv_heads)
        if function is eager:
            return eager(*args)
        try:
            return function(*args)
        except Exception as error:  # noqa: BLE001 - any compile failure: run it eagerly
            if torch.cuda.is_current_stream_capturing():
                raise
            log.warning("torch.compile of the decoder layer failed; running it eagerly: %s",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            if fused:
                self.fused_function = eager
            else:
                self.function = eager
            return eager(*args)


def allow_recompiles() -> None:
    """Room for the layer's compiled variants: one per window and context shape, captured pass
    and tensor kind (torch.compile's default limit, 8, is nearly reached by the GPU check's
    holes; past it a fullgraph compile fails and the layer would run eagerly)."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def layers_of(network: torch.nn.Module) -> _Layers:
    """The network's `_Layers`, made on first use and kept on the network."""
    layers = getattr(network, "_diffusion_lsp_layers", None)
    if layers is None:
        layers = _Layers(network, next(network.parameters()).device)
        network._diffusion_lsp_layers = layers
    return layers


def window_forward(network: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                   keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor,
                   mask: torch.Tensor | None, fused: bool = False) -> torch.Tensor:
    """The network over a window of tokens against keys/values already in `keys`/`values`.

    ids, positions: (B, W). keys, values: per layer (B, kv_heads, S, head_dim); the window's
    own keys/values are written into rows `slots` (W,) in place, before attention. mask:
    (B, 1, W, S) additive, or None when every row may see every row. `fused`: through the
    fused projections (`fuse_projections`, done on first use). Returns the final-normed
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
        hidden = layers(index, hidden, cos, sin, keys[index], values[index], slots, grouped,
                        fused)
    return inner.norm(hidden)


@torch.inference_mode()
def rows_pass(model: LoadedModel, ids: torch.Tensor, positions: torch.Tensor,
              past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
              ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One pass of tokens `ids` (Q,) at sequence `positions` (Q,) against `past` rows (per
    layer (1, kv_heads, R, D); None: none), every row seeing every row: the sampler's full
    pass (no past) and the document cache's partial pass (model.decoding.prompt_cache), without
    transformers' per-call masks and caches. Returns hidden states (Q, H) and every layer's
    keys and values, the past's R rows then the Q new ones. With DIFFUSION_LSP_GRAPH_PASSES
    these are views of a captured pass's buffers (`HoleSteps.pass_rows`), valid until its next
    run: callers copy what they keep."""
    count = ids.numel()
    device = model.device
    reused = 0 if past is None else past[0][0].shape[-2]
    on = switches(model)
    if on.graph_passes and pass_shape(count, reused) is not None:
        return hole_steps(model).pass_rows(ids, positions, past, on.fused_projections)
    if past is None:
        keys, values = kv_buffers(model, 1, count)
    else:

        def grown(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat([rows, rows.new_empty((*rows.shape[:-2], count, rows.shape[-1]))],
                             dim=-2)

        keys, values = [grown(k) for k, _ in past], [grown(v) for _, v in past]
    slots = torch.arange(reused, reused + count, device=device)
    hidden = window_forward(model.network, to_device(ids[None], device),
                            to_device(positions[None], device), keys, values, slots, None,
                            on.fused_projections)
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


class _Key(NamedTuple):
    """What a captured graph is specific to."""

    kind: str  # "hole": a hole-only step; "pass": a full or partial pass
    width: int  # window rows (a pass: padded queries)
    rows: int  # context rows before the window (bucketed)
    fused: bool  # through the fused projections
    head: Head | None = None  # a hole step's graph head


@dataclass
class _Shape:
    """The static buffers of one `_Key` and, on CUDA, its captured graph. Rows [0, rows) hold
    the context (padding after it masked out), [rows, rows + W) the window; a pass writes its
    queries right after its real context rows instead (`slots`), the rest masked."""

    key: _Key
    inputs: torch.Tensor  # (2, W): the window's ids, then their positions
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    slots: torch.Tensor  # (W,): where the window's keys and values go
    mask: torch.Tensor  # (1, 1, W, rows + W)
    bans: torch.Tensor | None = None  # (n, C) bool: the graph head's per-row bans
    never: torch.Tensor | None = None  # (k,) the never-sampled ids, on the device
    columns: torch.Tensor | None = None  # (C,) the head's columns, on the device
    context: object | None = None  # the ContextCache whose rows the buffers hold
    output: torch.Tensor | None = None  # (1, W, H) hidden states, or the head's (2, n)
    graph: torch.cuda.CUDAGraph | None = None
    uncaptured: bool = False  # its capture failed: this shape runs eagerly


class HoleSteps:
    """Hole-only passes of one hole at a time through fixed-shape buffers (a CUDA graph each
    on CUDA; eager elsewhere, which tests use), and with DIFFUSION_LSP_GRAPH_PASSES full and
    partial passes too (`pass_rows`). Used from the engine's one thread."""

    def __init__(self, model: LoadedModel, graphs: bool | None = None) -> None:
        self.model = model
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self._shapes: OrderedDict[_Key, _Shape] = OrderedDict()
        self._generation = 0  # of the network's weights the kept graphs read
        self.captures = 0
        self.replays = 0
        self.capture_failures = 0

    @torch.inference_mode()
    def run(self, context_layers: list[tuple[torch.Tensor, torch.Tensor]], context: object,
            window_ids: torch.Tensor, start: int, fused: bool = False, head: Head | None = None,
            bans: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (W, H) of the window `window_ids` (W,) at sequence positions start..,
        against `context_layers` (per layer (1, kv_heads, C, D)); `context` is their owner,
        whose identity says when the buffers must be refilled. With a `head` (and its `bans`,
        `model.decoding.scoring.step_head`), the graph head's scores instead: (2, n) tokens and raw
        confidences of the hole's n positions (`model.decoding.scoring.greedy_scores`). On the
        device, rewritten by the shape's next run."""
        width = window_ids.numel()
        rows = context_layers[0][0].shape[-2]
        self._follow_weights(fused)
        shape = self._shape(_Key("hole", width, bucket(rows), fused, head))
        if shape.context is not context:
            self._load_context(shape, context_layers, rows)
            shape.context = context
        upload(shape.inputs, torch.stack([window_ids, torch.arange(start, start + width)]))
        if head is not None:
            upload(shape.bans, bans)
        self._replay(shape)
        return shape.output if head is not None else shape.output[0]

    @torch.inference_mode()
    def pass_rows(self, ids: torch.Tensor, positions: torch.Tensor,
                  past: list[tuple[torch.Tensor, torch.Tensor]] | None, fused: bool = False
                  ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """`rows_pass` on a static shape (`pass_shape`: the queries padded, the past's rows
        bucketed): the past copied in, the queries' rows written right after it, padding
        masked. Returns views of the shape's buffers (valid until its next run)."""
        count = ids.numel()
        reused = 0 if past is None else past[0][0].shape[-2]
        padded, rows = pass_shape(count, reused)
        self._follow_weights(fused)
        shape = self._shape(_Key("pass", padded, rows, fused))
        for index, (keys, values) in enumerate(past or ()):
            shape.keys[index][..., :reused, :].copy_(keys)
            shape.values[index][..., :reused, :].copy_(values)
        torch.arange(reused, reused + padded, out=shape.slots)
        columns = torch.arange(shape.mask.shape[-1], device=shape.mask.device)
        shape.mask.copy_(additive_mask(columns < reused + count, shape.mask.dtype)
                         .expand_as(shape.mask))
        inputs = torch.zeros((2, padded), dtype=torch.long)  # padding: id 0 at position 0
        inputs[0, :count], inputs[1, :count] = ids, positions
        upload(shape.inputs, inputs)
        self._replay(shape)
        end = reused + count
        layers = [(keys[..., :end, :], values[..., :end, :])
                  for keys, values in zip(shape.keys, shape.values, strict=True)]
        return shape.output[0, :count], layers

    @property
    def buffer_bytes(self) -> int:
        """Bytes in the kept shapes' keys and values buffers."""
        return sum(t.numel() * t.element_size() for shape in self._shapes.values()
                   for t in (*shape.keys, *shape.values))

    def _follow_weights(self, fused: bool) -> None:
        """Fuse the projections when asked; once the weights moved, drop every kept graph
        (a replay would read the old weights' freed memory)."""
        layers = layers_of(self.model.network)
        if fused:
            layers.fuse()
        if layers.generation != self._generation:
            self._shapes.clear()
            self._generation = layers.generation

    def _shape(self, key: _Key) -> _Shape:
        shape = self._shapes.get(key)
        if shape is None:
            device, width, rows = self.model.device, key.width, key.rows
            keys, values = kv_buffers(self.model, 1, rows + width)
            shape = _Shape(
                key=key, inputs=torch.zeros((2, width), dtype=torch.long, device=device),
                keys=keys, values=values,
                slots=torch.arange(rows, rows + width, device=device),
                mask=torch.zeros((1, 1, width, rows + width), dtype=self.model.dtype,
                                 device=device))
            if key.head is not None:
                shape.bans = torch.zeros((key.head.rows, len(key.head.columns)),
                                         dtype=torch.bool, device=device)
                shape.never = self.model.never_sample_ids.to(device)
                shape.columns = torch.tensor(key.head.columns, dtype=torch.long, device=device)
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
        hidden = window_forward(self.model.network, shape.inputs[0:1], shape.inputs[1:2],
                                shape.keys, shape.values, shape.slots, shape.mask,
                                shape.key.fused)
        head = shape.key.head
        if head is None:
            return hidden
        logits = self.model.network.lm_head(hidden[0, :head.rows]).float()  # (n, V)
        return greedy_scores(logits, head, shape.never, shape.columns, shape.bans)

    def _replay(self, shape: _Shape) -> None:
        """Run the shape's step: eagerly without graphs, else its graph (captured first). A
        shape whose capture fails runs eagerly from then on; the others keep their graphs."""
        if not self.graphs or shape.uncaptured:
            shape.output = self._forward(shape)
        elif shape.graph is None:
            try:
                self._capture(shape)
            except Exception as error:  # noqa: BLE001 - the step still runs, uncaptured
                key = shape.key
                log.warning("CUDA graph capture of a %s step (%d rows over %d, fused %s, graph "
                            "head %s) failed; that shape runs uncaptured: %s", key.kind,
                            key.width, key.rows, key.fused, key.head is not None,
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
                shape.uncaptured = True
                self.capture_failures += 1
                shape.output = self._forward(shape)
        else:
            shape.graph.replay()
            self.replays += 1

    def _capture(self, shape: _Shape) -> None:
        shape.graph, shape.output = capture(lambda: self._forward(shape), self.model.device)
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
    # thread_local: a CUDA call from another thread (the server's) cannot break the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = run()
    graph.replay()
    return graph, output


def hole_steps(model: LoadedModel) -> HoleSteps:
    """The model's HoleSteps, made on first use."""
    if model.hole_steps is None:
        model.hole_steps = HoleSteps(model)
    return model.hole_steps
