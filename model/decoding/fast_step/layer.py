"""The Qwen2 / Llama decoder layer written out (`decoder_layer`, `fused_decoder_layer`), and
the network as a plain loop of it over a window against keys and values already in buffers
(`window_forward`); on CUDA, for networks from COMPILE_PARAMETERS up, the layer is compiled
by torch.compile (`layers_of`)."""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the network's own

from model.decoding.fast_step.switchboard import COMPILE_ENV
from model.network import quantize
from model.network.loader import LoadedModel

COMPILE_PARAMETERS = 200_000_000  # torch.compile pays off from about this size (0.5B and up)
RECOMPILE_LIMIT = 32  # compiled variants of the layer allowed (`allow_recompiles`)
log = logging.getLogger(__name__)


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
        self.steps: object | None = None  # graphs.hole_steps: the HoleSteps over these layers
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
    """The network's `_Layers`, made on first use and kept on the network (with its
    `HoleSteps`: graphs.hole_steps)."""
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
