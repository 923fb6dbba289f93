"""The denoising passes without transformers' per-call overhead, and the hole step as a CUDA graph.

At batch 1, a denoising step that runs the hole's window against its cached context is bound by
reading the weights once (a 7B network in bf16: 14 GB, about 3 ms on an H200). Run through
transformers' modules in eager mode it is bound by the CPU instead: some 1,200 kernels a
step, each launched from Python, around masks and caches built anew on every call. This package
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

It computes what the sampler's passes through transformers compute (tests/test_fast_step.py
compares them on every family's tiny checkpoint; tests/test_cuda.py on the GPU, compiled and
captured). Grouped-query attention runs with each key/value head's query heads stacked along
the query axis, one SDPA call over the unrepeated keys and values (transformers' repeat_kv
would copy the context's keys group-size times a layer).

Four parts, each its own module: switchboard.py (which optional parts are on, from the
environment), layer.py (the decoder layer written out, and the network as a loop of it),
graphs.py (fixed-shape passes, captured as CUDA graphs and kept per model), block_step.py (a
block-diffusion family's block-causal forwards against its exact cache, on the same loop).
"""

from model.decoding.fast_step.block_step import BlockSteps, block_rows, block_steps
from model.decoding.fast_step.graphs import (
    CONTEXT_BUCKET,
    MAX_BUFFER_BYTES,
    MAX_GRAPHS,
    MAX_PACKED_BYTES,
    MAX_PASS_ROWS,
    QUERY_BUCKET,
    WARM_UP_RUNS,
    WINDOW_BUCKET,
    HoleSteps,
    PackedWindow,
    bucket,
    capture,
    hole_steps,
    packed_bucket,
    pass_shape,
    round_up,
    rows_pass,
)
from model.decoding.fast_step.layer import (
    COMPILE_PARAMETERS,
    RECOMPILE_LIMIT,
    LayerWeights,
    additive_mask,
    allow_recompiles,
    attention,
    decoder_layer,
    fuse_linears,
    fuse_projections,
    fused_decoder_layer,
    kv_buffers,
    layer_weights,
    layers_of,
    rms_norm,
    window_forward,
)
from model.decoding.fast_step.switchboard import (
    ATTENTION,
    BLOCK_GRAPHS_ENV,
    COMPILE_ENV,
    DISABLE_ENV,
    FUSED_PROJECTIONS_ENV,
    GRAPH_HEAD_ENV,
    GRAPH_PASSES_ENV,
    PACKED_GRAPHS_ENV,
    SWITCH_ENVS,
    SWITCH_VALUES,
    Switches,
    block_graphs,
    enabled,
    parse_switch,
    supported,
    switches,
)

__all__ = [
    "ATTENTION", "COMPILE_ENV", "COMPILE_PARAMETERS", "CONTEXT_BUCKET", "DISABLE_ENV",
    "FUSED_PROJECTIONS_ENV", "GRAPH_HEAD_ENV", "GRAPH_PASSES_ENV", "HoleSteps", "LayerWeights",
    "MAX_BUFFER_BYTES", "MAX_GRAPHS", "MAX_PACKED_BYTES", "MAX_PASS_ROWS",
    "PACKED_GRAPHS_ENV", "QUERY_BUCKET", "RECOMPILE_LIMIT", "SWITCH_ENVS", "SWITCH_VALUES",
    "PackedWindow", "Switches", "WARM_UP_RUNS", "WINDOW_BUCKET", "additive_mask",
    "allow_recompiles", "attention", "bucket", "capture", "decoder_layer", "enabled",
    "fuse_linears", "fuse_projections", "fused_decoder_layer", "hole_steps", "kv_buffers",
    "layer_weights", "layers_of", "packed_bucket", "parse_switch", "pass_shape", "rms_norm",
    "round_up", "rows_pass", "supported", "switches", "window_forward",
    "BLOCK_GRAPHS_ENV", "BlockSteps", "block_graphs", "block_rows", "block_steps",
]
