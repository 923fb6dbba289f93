"""The fast step's switchboard: whether it runs at all (`enabled`: CUDA, a supported network,
DIFFUSION_LSP_CUDA_GRAPHS not "0"), and its optional parts.

Four switches, each an environment variable (`Switches`; 1 / 0, unset: off; on CUDA only,
elsewhere said once and left off):
- DIFFUSION_LSP_GRAPH_HEAD: a greedy hole step runs its LM head (over the hole's rows only)
  and its scoring (`model.decoding.scoring.greedy_scores`) inside the captured graph too; the step
  returns each position's token and confidence, and the one host sync is that (2, n) copy.
- DIFFUSION_LSP_FUSED_PROJECTIONS: q/k/v in one matrix product and gate/up in one
  (`fuse_projections`: the modules' weights become views of the fused ones, so nothing is held
  twice; the same numbers up to the matrix products' rounding).
- DIFFUSION_LSP_GRAPH_PASSES: full and partial passes are captured too, on static shapes: the
  queries padded to a multiple of QUERY_BUCKET, the reused context to CONTEXT_BUCKET, at most
  MAX_PASS_ROWS rows in all.
- DIFFUSION_LSP_PACKED_GRAPHS: several holes' hole-only steps (`model.decoding.packed_step`)
  run as one batch of a bucketed shape, captured once per bucket (`HoleSteps.run_packed`).

And, apart from those three (`block_graphs`): DIFFUSION_LSP_BLOCK_GRAPHS, a block-diffusion
family's block forwards (`block_step.BlockSteps`) captured as CUDA graphs, one per block width
and context bucket (unset: off, until the GPU check measures it: gpu.json `block8b`).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

from model.network import quantize
from model.network.loader import LoadedModel

DISABLE_ENV = "DIFFUSION_LSP_CUDA_GRAPHS"  # "0": every pass runs through transformers
COMPILE_ENV = "DIFFUSION_LSP_COMPILE"  # "0": the decoder layer is not compiled
GRAPH_HEAD_ENV = "DIFFUSION_LSP_GRAPH_HEAD"  # "1": LM head and greedy scoring in the graph
FUSED_PROJECTIONS_ENV = "DIFFUSION_LSP_FUSED_PROJECTIONS"  # "1": q/k/v and gate/up fused
GRAPH_PASSES_ENV = "DIFFUSION_LSP_GRAPH_PASSES"  # "1": full and partial passes captured too
BLOCK_GRAPHS_ENV = "DIFFUSION_LSP_BLOCK_GRAPHS"  # "1": block-diffusion forwards captured
PACKED_GRAPHS_ENV = "DIFFUSION_LSP_PACKED_GRAPHS"  # "1": packed hole-only steps captured too
SWITCH_VALUES = {"1": True, "on": True, "true": True, "yes": True,
                 "0": False, "off": False, "false": False, "no": False}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
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
    packed_graphs: bool = False


SWITCH_ENVS = {"graph_head": GRAPH_HEAD_ENV, "fused_projections": FUSED_PROJECTIONS_ENV,
               "graph_passes": GRAPH_PASSES_ENV, "packed_graphs": PACKED_GRAPHS_ENV}
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
        for env in SWITCH_ENVS.values():
            if parse_switch(env, os.environ.get(env)) and (env, "off") not in _warned:
                _warned.add((env, "off"))
                log.warning("%s is ignored on %s: the fast step's switches act on CUDA only",
                            env, model.device)
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


def block_graphs(model: LoadedModel) -> bool:
    """Whether a block-diffusion forward runs captured (DIFFUSION_LSP_BLOCK_GRAPHS; off unless
    set, and only where the fast step runs)."""
    return enabled(model) and parse_switch(BLOCK_GRAPHS_ENV, os.environ.get(BLOCK_GRAPHS_ENV))
