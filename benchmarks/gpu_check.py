"""`python -m benchmarks.gpu_check`: the GPU figures of one borrowed-GPU run, in one JSON file.

`scripts/gpu-check.sh` runs the CUDA tests first, then this, then training with the time left.
Every section merges what it measured into the output (benchmarks/results/gpu.json's format) as
soon as it has it, so a run stopped by its time limit keeps what it got. Sections:

- speed: a random-weight model of a published shape (qwen2.5-7b = Dream-Coder-7B's, bf16, made
  on the GPU). One 64-token hole filled at exactly 1, 2, 4 and 8 tokens a step (end tokens
  banned, so every hole has 64 real tokens), with the document's context cached as while the
  user types: ms per hole-only step (median) and tokens/s of the whole hole (median over
  holes); the same at 8 tokens a step through transformers' eager modules (no CUDA graph);
  the HBM bound of a step (bytes of weights and keys/values read once / the card's
  bandwidth, and the same over the bandwidth a device-to-device copy reaches here); the same
  network as an autoregressive model (causal, its KV cache, greedy, CUDA graph a token) on the
  same 64 tokens after the same prefix. `fast_path` says which of the fast step's switches
  were on (model.decoding.fast_step.switchboard.Switches).
- switches: the same hole at 8 tokens a step with each of the fast step's switches on alone,
  all off and all on, side by side in one run (`compare`: the runs' order rotated from hole
  to hole, one untimed round first so that every run's graphs are captured).
- refresh: the same at 8 tokens a step with the context refresh off (refresh_every 0) against
  the default, all switches off and all on; and how many of the bundled model's completions
  change with the refresh off (server defaults and 8 tokens a step), on HumanEval holes.
- concurrent: 4, 16 and 64 editors against one engine (`concurrent4/16/64`), each typing in
  its own document (document cache on), closed loop (benchmarks/load_test.py's
  `editors_load`): 64-token holes at 8 tokens a step; p50, p95, one editor alone's p50 and
  the aggregate tokens/s, its batched steps packed into one pass (model.decoding.packed_step);
  then 16 editors again with the packed hole-only steps bucketed and captured
  (DIFFUSION_LSP_PACKED_GRAPHS: `concurrent16.packed_graphs`; on a CPU it falls back) and with
  FlexAttention's document mask (`concurrent16.flex_attention`, CUDA only).
- lsp: the server as its own process over stdio on the same shape; a document is opened, a
  completion asked for, one character typed, and the completion after it timed (p50).
- profile: the kernels of a hole-only step and of a full pass, by device time
  (torch.profiler), where the next optimisation should go.
- block8b: the 8B block-diffusion shape (Stable-DiffCoder-8B's, random weights, bf16) at its
  card's settings (blocks of 4, threshold 0.95): a 64-token hole's ms a step against the
  memory bound and tokens/s, beside the 7B Dream shape at one token a step; its block forwards
  through the fast step's layer loop (the default on CUDA), captured as CUDA graphs
  (DIFFUSION_LSP_BLOCK_GRAPHS) and through transformers, side by side (`by_path`; the first
  BLOCK_PATH_HOLES holes each).

They run speed, concurrent, lsp, then switches, refresh, profile, block8b: what gpu.json must
have first, the comparisons after (they rebuild the random model the lsp section let go).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.model_speed import card_bandwidth
from benchmarks.report import RESULTS, EvalDataMissing, load_holes
from diffusion_contract.options import InfillOptions
from diffusion_contract.options import hole_options as server_hole_options
from model.decoding import fast_step, packed_step
from model.decoding.fast_step import graphs
from model.decoding.hole import final_text, layout_ids
from model.decoding.passes import forward_holes, window
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import denoise_step, infill, new_state
from model.network import quantize
from model.network.loader import LoadedModel, load_model
from model.network.shapes import random_model_of_shape

HOLE_TOKENS = 64
TOKENS_PER_STEP = (1, 2, 4, 8)
CONCURRENT = (4, 16, 64)  # editors against one engine (`concurrent`)
CONCURRENT_REQUESTS = {"cuda": 3, "cpu": 1}  # timed completions per editor at each level
CONCURRENT_DOCUMENT_BYTES = 16 << 30  # the document cache of 64 editors' 7B contexts
COPY_BYTES = 2 << 30  # the device-to-device copy that measures usable bandwidth
SWITCH_RUNS = {  # run name -> the switches on in it (the rest off)
    "off": (),
    "graph_head": ("graph_head",),
    "fused_projections": ("fused_projections",),
    "graph_passes": ("graph_passes",),
    "all": tuple(fast_step.SWITCH_ENVS),
}
COMPARED_GRAPHS = 64  # graphs kept while runs are compared: no run recaptures another's
COMPARED_BUFFER_BYTES = 8 << 30  # ... and their keys/values buffers
BUNDLED_HOLES_PER_HOLE = 4  # the bundled model's refresh comparison: 4x --holes of each split
# in this order: the required figures first (speed, concurrent, lsp), so that a run
# stopped by its time limit has them; then 8- and 4-bit weights (each its own model); then the
# comparisons (the model is rebuilt after lsp and quantization); then block diffusion
SECTIONS = ("speed", "concurrent", "lsp", "quantization", "switches", "refresh", "profile",
            "block8b")
QUANTIZED = ("int8", "int4")
BLOCK_SHAPE = {"cuda": "seed-coder-8b", "cpu": "tiny-seed-coder"}  # block8b's, by device type
BLOCK_THRESHOLD = 0.95  # Stable-DiffCoder's card (generate_block's default threshold)
BLOCK_PATHS = {  # block8b's runs: where its block forwards go (the first is the default)
    "layer_loop": {fast_step.BLOCK_GRAPHS_ENV: "0"},
    "block_graphs": {fast_step.BLOCK_GRAPHS_ENV: "1"},
    "transformers": {fast_step.DISABLE_ENV: "0", fast_step.BLOCK_GRAPHS_ENV: "0"},
}
BLOCK_PATH_HOLES = 4  # holes each of block8b's runs times (three runs share the section's time)
BLOCK_PATH_FIELDS = ("ms_per_step", "tokens_per_s", "hole_ms_p50", "steps", "write_forwards")
MODEL_SECTIONS = ("speed", "switches", "refresh", "concurrent", "profile")  # on the random model


def sync(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


# ---------------------------------------------------------------------------------------------
# bounds


def bytes_per_hole_step(model: LoadedModel, context_rows: int, window: int) -> int:
    """The fewest bytes a hole-only step reads: every weight once (the embedding table only
    where the LM head is tied to it: a lookup reads W rows), every layer's keys and values."""
    network = model.network
    tied = network.lm_head.weight is network.model.embed_tokens.weight
    weights = sum(quantize.stored_bytes(p) for name, p in network.named_parameters()
                  if tied or "embed_tokens" not in name)
    config = network.config
    dim = network.model.layers[0].self_attn.head_dim
    kv = (2 * config.num_hidden_layers * config.num_key_value_heads * dim
          * (context_rows + window) * torch.tensor([], dtype=model.dtype).element_size())
    return weights + kv


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes/s a large device-to-device copy moves (read + write), median of 10."""
    if device.type != "cuda":
        return None
    source = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del source, target
    return 2 * COPY_BYTES / statistics.median(times[2:])


# ---------------------------------------------------------------------------------------------
# one hole, step by step


def fill(model: LoadedModel, hole: dict, options: InfillOptions, cache: PromptCache | None,
         document: str | None) -> dict:
    """The sampler's loop (model.decoding.sampler.infill), each step timed: every step ends with its
    tokens on the CPU, so the host clock times the GPU's work too. (The cache keeps the
    context after the first step, inside the first step's time, as in the loop.)"""
    sync(model)
    began = time.perf_counter()
    state = new_state(model, hole["prompt"], hole["suffix"], options)
    if cache is not None:
        cache.attach(model, document, state)
    steps = []
    while not state.finished:
        reused = state.reuse is not None and state.context is None  # the partial pass
        before, full_before = time.perf_counter(), state.full_passes
        denoise_step(model, [state], cache, [document])
        kind = "reuse" if reused else "full" if state.full_passes > full_before else "hole"
        steps.append((kind, (time.perf_counter() - before) * 1e3))
    total = (time.perf_counter() - began) * 1e3
    _, tokens = final_text(model, state)
    context = len(state.prefix_ids) + len(state.suffix_ids)
    writes = state.committed.writes if state.committed else 0  # block diffusion's cache writes
    return {"total_ms": total, "tokens": tokens, "steps": len(steps), "context_tokens": context,
            "write_forwards": writes,
            "hole_step_ms": [ms for kind, ms in steps if kind == "hole"],
            "step_ms": steps, "kinds": [kind for kind, _ in steps]}


def hole_options(tokens_per_step: int) -> InfillOptions:
    return InfillOptions(max_tokens=HOLE_TOKENS, initial_tokens=HOLE_TOKENS,
                         tokens_per_step=tokens_per_step, min_tokens=HOLE_TOKENS)


def summary(cold: list[dict], warm: list[dict]) -> dict:
    """One configuration's figures from its holes' fills: cold (nothing cached), then warm
    (typing: the document's context cached)."""
    step_ms = [ms for run in warm for ms in run["hole_step_ms"]]

    def median_of(kind: str) -> float | None:
        times = [ms for run in warm for k, ms in run["step_ms"] if k == kind]
        return statistics.median(times) if times else None

    return {
        "ms_per_step": statistics.median(step_ms) if step_ms else None,
        "partial_pass_ms": median_of("reuse"), "full_pass_ms": median_of("full"),
        "tokens_per_s": statistics.median(r["tokens"] / r["total_ms"] * 1e3 for r in warm),
        "cold_tokens_per_s": statistics.median(r["tokens"] / r["total_ms"] * 1e3 for r in cold),
        "hole_ms_p50": statistics.median(r["total_ms"] for r in warm),
        "steps": statistics.median(r["steps"] for r in warm),
        "write_forwards": statistics.median(r["write_forwards"] for r in warm),
        "step_kinds": warm[0]["kinds"],
        "tokens": statistics.median(r["tokens"] for r in warm),
        "context_tokens_p50": statistics.median(r["context_tokens"] for r in warm),
    }


def bench_hole(model: LoadedModel, holes: list[dict], tokens_per_step: int) -> dict:
    """Each hole twice in one document: cold (nothing cached), then warm (typing: the
    document's context cached)."""
    return bench_options(model, holes, hole_options(tokens_per_step))


def bench_options(model: LoadedModel, holes: list[dict], options: InfillOptions) -> dict:
    """`bench_hole` with any options."""
    cache = PromptCache()
    fill(model, holes[0], options, cache, "warm-up")
    cold, warm = [], []
    for index, hole in enumerate(holes):
        cold.append(fill(model, hole, options, cache, f"doc-{index}"))
        warm.append(fill(model, hole, options, cache, f"doc-{index}"))
    return summary(cold, warm)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set to `values`; as they were after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def switched(on: Iterable[str]) -> Iterator[None]:
    """The fast step's switches (`fast_step.SWITCH_ENVS`) set: those named in `on` on, the
    rest off; the environment as it was after."""
    on = set(on)
    with environment({env: "1" if name in on else "0"
                      for name, env in fast_step.SWITCH_ENVS.items()}):
        yield


@contextlib.contextmanager
def kept_graphs(count: int) -> Iterator[None]:
    """At least `count` captured shapes (and COMPARED_BUFFER_BYTES of their buffers) kept while
    runs are compared: fast_step's bounds fit one configuration's; several side by side would
    evict each other's and time recaptures."""
    saved = graphs.MAX_GRAPHS, graphs.MAX_BUFFER_BYTES
    graphs.MAX_GRAPHS = max(saved[0], count)
    graphs.MAX_BUFFER_BYTES = max(saved[1], COMPARED_BUFFER_BYTES)
    try:
        yield
    finally:
        graphs.MAX_GRAPHS, graphs.MAX_BUFFER_BYTES = saved


def compare(model: LoadedModel, holes: list[dict],
            runs: dict[str, tuple[tuple[str, ...], InfillOptions]]) -> dict:
    """Runs (name -> the switches on, the options) side by side: each hole filled cold then
    warm by every run in turn, the runs' order rotated from hole to hole, so that drift on the
    machine spreads over all; one untimed round first captures every run's graphs. Each run
    keeps its own document cache. Returns each run's `summary` and the switches in force."""
    names = list(runs)
    if fast_step.enabled(model) and any("fused_projections" in on for on, _ in runs.values()):
        fast_step.layers_of(model.network).fuse()  # now: fusing later drops every graph
    caches = {name: PromptCache() for name in names}
    timed: dict[str, tuple[list[dict], list[dict]]] = {name: ([], []) for name in names}
    active: dict[str, dict] = {}
    with kept_graphs(COMPARED_GRAPHS):
        for timing in (False, True):
            for index, hole in enumerate(holes):
                turn = index % len(names)
                for name in names[turn:] + names[:turn]:
                    on, options = runs[name]
                    document = f"{'timed' if timing else 'untimed'}-{index}"
                    with switched(on):
                        active[name] = fast_step.switches(model)._asdict()
                        cold = fill(model, hole, options, caches[name], document)
                        warm = fill(model, hole, options, caches[name], document)
                    if timing:
                        timed[name][0].append(cold)
                        timed[name][1].append(warm)
    return {name: {**summary(*timed[name]), "switches": active[name]} for name in names}


# ---------------------------------------------------------------------------------------------
# the autoregressive twin


class AutoregressiveTwin:
    """The same network, causal, decoding greedily with its KV cache: each token one replay of
    a captured step (fixed shapes; the next token and position are written on the GPU, so
    decoding runs without a host sync until the end). The prompt's keys and values are filled
    beforehand, as a prompt cache keeps them."""

    def __init__(self, model: LoadedModel, prompt_ids: list[int], new_tokens: int) -> None:
        self.model = model
        device, dtype = model.device, model.dtype
        rows = fast_step.bucket(len(prompt_ids) + new_tokens)
        with torch.inference_mode():  # inference tensors, as the hole steps' buffers (one
            # compiled variant of the layer for both, not two)
            self.keys, self.values = fast_step.kv_buffers(model, 1, rows)
            self.columns = torch.arange(rows, device=device)
            ids = torch.tensor([prompt_ids], device=device)
            count = len(prompt_ids)
            positions = torch.arange(count, device=device)
            causal = self.columns[None, :] <= positions[:, None]  # (P, rows)
            hidden = fast_step.window_forward(
                model.network, ids, positions[None], self.keys, self.values, positions,
                fast_step.additive_mask(causal, dtype)[None, None])
            self.token = model.network.lm_head(hidden[:, -1:]).argmax(-1)  # (1, 1)
            self.position = torch.full((1, 1), count, dtype=torch.long, device=device)
        self.graph = None
        self.generated: list[torch.Tensor] = []

    def _step(self) -> torch.Tensor:
        visible = self.columns[None, :] <= self.position  # (1, rows)
        mask = fast_step.additive_mask(visible, self.model.dtype)[None, None]  # (1, 1, 1, rows)
        hidden = fast_step.window_forward(self.model.network, self.token, self.position,
                                          self.keys, self.values, self.position[0], mask)
        following = self.model.network.lm_head(hidden).argmax(-1)  # (1, 1)
        self.token.copy_(following)
        self.position.add_(1)
        return following

    @torch.inference_mode()
    def decode(self, tokens: int) -> float:
        """Milliseconds to decode `tokens` tokens (the first call also captures the step)."""
        graphs = self.model.device.type == "cuda"
        if graphs and self.graph is None:
            self.graph, _ = fast_step.capture(self._step, self.model.device)
        sync(self.model)
        began = time.perf_counter()
        for _ in range(tokens):
            if graphs:
                self.graph.replay()
            else:
                self._step()
        sync(self.model)
        return (time.perf_counter() - began) * 1e3


def bench_autoregressive(model: LoadedModel, holes: list[dict]) -> dict:
    rates = []
    for hole in holes:
        prompt, _ = layout_ids(model, hole["prompt"], "")
        # the capture warms up and replays: start the timed run at a fresh twin's first token
        twin = AutoregressiveTwin(model, prompt, 2 * HOLE_TOKENS + 8)
        twin.decode(4)
        rates.append(HOLE_TOKENS / twin.decode(HOLE_TOKENS) * 1e3)
    return {"tokens_per_s": statistics.median(rates), "holes": len(rates)}


# ---------------------------------------------------------------------------------------------
# sections


def speed(model: LoadedModel, holes: list[dict], result: dict) -> None:
    context = statistics.median(sum(len(p) for p in layout_ids(model, h["prompt"], h["suffix"]))
                                for h in holes)
    bytes_read = bytes_per_hole_step(model, int(context), HOLE_TOKENS)
    card, copy = card_bandwidth(model), copy_bandwidth(model.device)
    entry = result.setdefault("hole64_7b", {})
    entry.update({
        "shape": str(model.path), "dtype": str(model.dtype),
        "parameters": sum(p.numel() for p in model.network.parameters()),
        "bytes_per_step": bytes_read, "context_tokens_p50": context,
        "hbm_bound_ms_per_step": bytes_read / card * 1e3 if card else None,
        "card_bandwidth_bytes_per_s": card,
        "copy_bandwidth_bytes_per_s": copy,
        "copy_bound_ms_per_step": bytes_read / copy * 1e3 if copy else None,
        "by_tokens_per_step": {},
    })
    began = time.perf_counter()
    fill(model, holes[0], hole_options(8), None, None)  # compiles and captures: not timed
    entry["warm_up_s"] = round(time.perf_counter() - began, 1)
    say(f"warmed up (compile, capture) in {entry['warm_up_s']} s")
    for tokens_per_step in TOKENS_PER_STEP:
        run = bench_hole(model, holes, tokens_per_step)
        entry["by_tokens_per_step"][str(tokens_per_step)] = run
        say(f"hole64 {tokens_per_step}/step: {run['ms_per_step']:.2f} ms/step, "
            f"{run['tokens_per_s']:.0f} tokens/s (cold {run['cold_tokens_per_s']:.0f}), "
            f"steps {run['steps']}, kinds {''.join(k[0] for k in run['step_kinds'])}")
    layers = fast_step.layers_of(model.network)
    entry["compiled"] = layers.compiled
    if layers.compiled:  # the same with the layer loop uncompiled (CUDA graphs still)
        compiled = layers.function, layers.fused_function
        layers.function, layers.fused_function = (fast_step.decoder_layer,
                                                  fast_step.fused_decoder_layer)
        graphs, layers.steps = layers.steps, None
        try:
            plain = bench_hole(model, holes, 8)
        finally:
            (layers.function, layers.fused_function), layers.steps = compiled, graphs
        entry["uncompiled_tokens_per_step_8"] = plain
        say(f"hole64 8/step without torch.compile: {plain['ms_per_step']:.2f} ms/step, "
            f"{plain['tokens_per_s']:.0f} tokens/s")
    os.environ[fast_step.DISABLE_ENV] = "0"
    try:
        eager = bench_hole(model, holes, 8)
    finally:
        os.environ.pop(fast_step.DISABLE_ENV)
    entry["eager_tokens_per_step_8"] = eager
    say(f"hole64 8/step through transformers' eager modules: {eager['ms_per_step']:.2f} ms/step,"
        f" {eager['tokens_per_s']:.0f} tokens/s")
    if entry["hbm_bound_ms_per_step"]:
        say(f"HBM bound {entry['hbm_bound_ms_per_step']:.2f} ms/step "
            f"({bytes_read / 1e9:.2f} GB at {card / 1e12:.1f} TB/s); copy reaches "
            f"{copy / 1e12:.2f} TB/s: {entry['copy_bound_ms_per_step']:.2f} ms/step")
    result["fast_path"] = fast_path(model)
    twin = bench_autoregressive(model, holes)
    result["ar_twin_tokens_per_s"] = twin["tokens_per_s"]
    diffusion = entry["by_tokens_per_step"]["8"]["tokens_per_s"]
    result["diffusion_over_ar_at_8"] = diffusion / twin["tokens_per_s"]
    say(f"autoregressive twin {twin['tokens_per_s']:.0f} tokens/s; diffusion at 8/step "
        f"{result['diffusion_over_ar_at_8']:.2f}x")


def by_quantization(shape: str, device: str, holes: list[dict], result: dict) -> None:
    """hole64_7b.by_quantization.{int8,int4}: the shape's random model built in 8 and 4 bits
    (quantized layer by layer as it is made), a 64-token hole at 8 tokens a step with the
    document's context cached: tokens/s, ms a step against the bound of the bytes it reads,
    and the peak GPU memory from the build on."""
    entry = result.setdefault("hole64_7b", {}).setdefault("by_quantization", {})
    for scheme in QUANTIZED:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        model = random_model_of_shape(shape, device, quantization=scheme)
        built = time.perf_counter() - began
        context = statistics.median(sum(len(p) for p in layout_ids(model, h["prompt"],
                                                                   h["suffix"]))
                                    for h in holes)
        bytes_read = bytes_per_hole_step(model, int(context), HOLE_TOKENS)
        card = card_bandwidth(model)
        run = bench_hole(model, holes, 8)
        peak = (torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda"
                else None)
        entry[scheme] = {
            "quantization": model.quantization, "notice": model.quantization_notice,
            "tokens_per_s_at_8": run["tokens_per_s"], "ms_per_step": run["ms_per_step"],
            "bound_ms_per_step": bytes_read / card * 1e3 if card else None,
            "bytes_per_step": bytes_read, "peak_memory_gib": peak, "build_s": round(built, 1),
            "steps": run["steps"], "tokens": run["tokens"]}
        say(f"hole64 {scheme} 8/step: {run['ms_per_step']:.2f} ms/step, "
            f"{run['tokens_per_s']:.0f} tokens/s, peak {peak or 0:.1f} GiB")
        del model


def fast_path(model: LoadedModel) -> dict:
    """What the fast step does for `model` here: on at all, compiled, each switch."""
    on = fast_step.enabled(model)
    steps = fast_step.layers_of(model.network).steps if on else None
    return {"enabled": on, "switches": fast_step.switches(model)._asdict(),
            "compiled": on and fast_step.layers_of(model.network).compiled,
            "max_graphs": fast_step.MAX_GRAPHS,
            "graphs": steps is not None and steps.graphs,
            "captures": steps.captures if steps else 0,
            "capture_failures": steps.capture_failures if steps else 0}


def switch_runs(model: LoadedModel, holes: list[dict], result: dict) -> None:
    """hole64_7b.switches_at_8: each switch on against all off (and all on), side by side."""
    options = hole_options(8)
    runs = {name: (on, options) for name, on in SWITCH_RUNS.items()}
    compared = compare(model, holes, runs)
    entry = result.setdefault("hole64_7b", {})["switches_at_8"] = {
        "holes": len(holes), "order": "interleaved, rotated from hole to hole",
        "kept_graphs": COMPARED_GRAPHS, "runs": compared,
        "fast_path_after": fast_path(model)}  # a failed capture shows here
    for name, run in compared.items():
        say(f"switches {name}: {run['ms_per_step']:.2f} ms/step, {run['tokens_per_s']:.0f} "
            f"tokens/s (full pass {run['full_pass_ms'] or 0:.1f} ms, partial pass "
            f"{run['partial_pass_ms'] or 0:.1f} ms)")
    entry["agreement"] = agreement(model, holes[0])
    say(f"switches agree: {entry['agreement']}")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference||, in float64 on the CPU (METHOD: fp32 lands far
    under 1e-3, bf16 operands between 1e-3 and 1e-2; NaN never passes)."""
    value, reference = value.double().cpu(), reference.double().cpu()
    error = float((value - reference).norm() / reference.norm())
    return error if error == error else float("inf")


def agreement(model: LoadedModel, hole: dict) -> dict:
    """How far the switched computations are from the plain ones on this shape (relative
    error of hidden states; bf16 matrix products land between 1e-3 and 1e-2): a hole step
    through fused projections against unfused, a captured full pass against uncaptured."""
    if not fast_step.enabled(model):
        return {}
    state = new_state(model, hole["prompt"], hole["suffix"], hole_options(8))
    forward_holes(model, [state])
    start, end = window(state, model.family.shifted_logits)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    steps = fast_step.hole_steps(model)
    unfused = steps.run(*args).clone()
    fused = steps.run(*args, fused=True)
    sequence = state.sequence()
    positions = torch.arange(sequence.numel())
    with switched(()):
        plain = fast_step.rows_pass(model, sequence, positions)[0].clone()
    with switched(("graph_passes",)):
        captured = fast_step.rows_pass(model, sequence, positions)[0]
    return {"fused_hole_step": relative_error(fused, unfused),
            "captured_full_pass": relative_error(captured, plain)}


def bundled_refresh(device: str, data: Path | None, per_split: int) -> dict:
    """How many of the bundled model's completions change with the context refresh off, on
    HumanEval holes of both splits: with the server's defaults (threshold) and at 8 tokens
    a step."""
    bundled = load_model(None, device=device)
    holes = [(hole, split) for split in ("single-line", "multi-line")
             for hole in load_holes(split, per_split, data)]
    changed: dict[str, list[str]] = {}
    for setting in ("server_defaults", "tokens_per_step_8"):
        changed[setting] = []
        for hole, split in holes:
            single = split == "single-line"
            options = server_hole_options(32 if single else 64, single_line=single,
                                          tokens_per_step=8 if setting != "server_defaults"
                                          else None)
            texts = {refresh: infill(bundled, hole["prompt"], hole["suffix"],
                                     replace(options, refresh_every=refresh)).text
                     for refresh in (options.refresh_every, 0)}
            if len(set(texts.values())) > 1:
                changed[setting].append(hole["task_id"])
    return {"holes": len(holes), "device": str(bundled.device), "dtype": str(bundled.dtype),
            "refresh_every_default": InfillOptions().refresh_every,
            **{f"changed_{k}": len(v) for k, v in changed.items()},
            "changed_tasks": changed}


def refresh_runs(model: LoadedModel, holes: list[dict], data: Path | None, per_split: int,
                 result: dict) -> None:
    """hole64_7b.refresh_every_0_at_8: the refresh off against the default, side by side."""
    default = hole_options(8)
    runs = {}
    for label, on in (("switches_off", ()), ("all_switches", tuple(fast_step.SWITCH_ENVS))):
        runs[f"{label}/default"] = (on, default)
        runs[f"{label}/refresh_every_0"] = (on, replace(default, refresh_every=0))
    compared = compare(model, holes, runs)
    entry: dict = {"holes": len(holes), "refresh_every_default": default.refresh_every}
    for name, run in compared.items():
        label, setting = name.split("/")
        entry.setdefault(label, {})[setting] = run
        say(f"refresh {label} {setting}: {run['ms_per_step']:.2f} ms/step, "
            f"{run['tokens_per_s']:.0f} tokens/s, kinds "
            f"{''.join(k[0] for k in run['step_kinds'])}")
    result.setdefault("hole64_7b", {})["refresh_every_0_at_8"] = entry
    entry["bundled"] = bundled_refresh(str(model.device), data, per_split)
    say(f"refresh off on the bundled model: {entry['bundled']['changed_server_defaults']} "
        f"(server defaults) and {entry['bundled']['changed_tokens_per_step_8']} (8 a step) "
        f"of {entry['bundled']['holes']} completions changed")


def kernel_table(run, repeats: int = 5, rows: int = 14) -> list[dict]:
    """The kernels `run()` launches, by device time (torch.profiler), per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        for _ in range(repeats):
            run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    on_gpu = torch.cuda.is_available()
    events = sorted(profiler.key_averages(), key=lambda e: -(
        getattr(e, "device_time_total", 0) if on_gpu else e.cpu_time_total))
    return [{"name": e.key[:80], "calls": e.count // repeats,
             "device_us": getattr(e, "device_time_total", 0) / repeats,
             "cpu_us": e.cpu_time_total / repeats} for e in events[:rows]]


def profile_steps(model: LoadedModel, holes: list[dict], result: dict) -> None:
    """Where a hole-only step and a full pass spend their time (the next optimisations)."""
    state = new_state(model, holes[0]["prompt"], holes[0]["suffix"], hole_options(8))
    forward_holes(model, [state])
    start, end = window(state, model.family.shifted_logits)
    steps = fast_step.hole_steps(model)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    steps.run(*args)
    sequence = state.sequence()
    positions = torch.arange(sequence.numel())

    def full() -> None:
        fast_step.rows_pass(model, sequence, positions)

    result["profile"] = {"hole_step": kernel_table(lambda: steps.run(*args)),
                         "full_pass": kernel_table(full)}
    for name, table in result["profile"].items():
        total = sum(row["device_us"] for row in table)
        say(f"profile {name}: top kernels {total / 1e3:.2f} ms of device time: " + ", ".join(
            f"{row['name'][:32]} x{row['calls']} {row['device_us'] / 1e3:.2f} ms"
            for row in table[:5]))


def concurrent(model: LoadedModel, holes: list[dict], result: dict) -> None:
    """`concurrent4/16/64`: N editors against one engine (`load_test.editors_load`), beside
    one editor alone in the same run; each level saved as soon as it is measured."""
    from benchmarks.load_test import editors_load, load_figures
    from model.engine import Engine

    options = hole_options(8)
    requests = CONCURRENT_REQUESTS.get(model.device.type, 1)  # the CPU's dry run: quick
    engine = Engine(model, max_batch=max(CONCURRENT), max_queued=max(CONCURRENT),
                    prompt_cache=PromptCache(max_documents=4 * max(CONCURRENT),
                                             max_bytes=CONCURRENT_DOCUMENT_BYTES))
    try:
        single = editors_load(engine, holes, 1, 2 * requests, options, "alone-")
        alone = load_figures([single], single["ms"])["tokens_per_s"]
        for editors in CONCURRENT:
            run = editors_load(engine, holes, editors, requests, options, f"{editors}-")
            entry = load_figures([run], single["ms"]) | {
                "editors": editors, "tokens_per_step": 8, "hole_tokens": HOLE_TOKENS,
                "document_cache": True, "single_tokens_per_s": alone,
                "packed_steps": packed_step.enabled(model)}
            entry["aggregate_over_single"] = entry["tokens_per_s"] / alone
            result[f"concurrent{editors}"] = entry
            say(f"{editors} editors: p50 {entry['p50_ms']:.0f} ms, p95 {entry['p95_ms']:.0f} ms;"
                f" one alone p50 {entry['single_p50_ms']:.0f} ms; {entry['tokens_per_s']:.0f} "
                f"tokens/s ({entry['aggregate_over_single']:.1f}x one alone)")
        if model.device.type == "cuda":  # the other packed attention, for the choice
            variant_run(engine, holes, options, requests, single["ms"], result,
                        "flex_attention", packed_step.ATTENTION_ENV, packed_step.FLEX)
        # packed hole-only steps captured per bucket; on a CPU it falls back (said once)
        variant_run(engine, holes, options, requests, single["ms"], result, "packed_graphs",
                    fast_step.PACKED_GRAPHS_ENV, "1")
    finally:
        engine.close()


def variant_run(engine: object, holes: list[dict], options: InfillOptions, requests: int,
                single: list[float], result: dict, name: str, env: str, value: str) -> None:
    """concurrent16 again with `env` set to `value` (on CUDA after 16 untimed editors: the
    compiles and the captures of their buckets): `concurrent16.<name>`, with whether the
    packed graphs were in force and what the fast step captured and replayed meanwhile.
    FlexAttention's document mask instead of one SDPA call a hole (`packed_step.ATTENTIONS`):
    `flex_attention`; the bucketed, captured batch (DIFFUSION_LSP_PACKED_GRAPHS):
    `packed_graphs`. A failure is kept there."""
    from benchmarks.load_test import editors_load, load_figures

    model = engine.model
    saved = os.environ.get(env)
    os.environ[env] = value
    try:
        if model.device.type == "cuda":
            editors_load(engine, holes, 16, 1, options, f"{name}-warm-")  # untimed
        steps = fast_step.hole_steps(model)
        before = steps.captures, steps.replays
        run = editors_load(engine, holes, 16, requests, options, f"{name}-16-")
        figures = load_figures([run], single) | {
            "packed_graphs": fast_step.switches(model).packed_graphs,
            "captures": steps.captures - before[0], "replays": steps.replays - before[1]}
        say(f"16 editors, {name}: p50 {figures['p50_ms']:.0f} ms, "
            f"{figures['tokens_per_s']:.0f} tokens/s")
    except Exception as error:  # noqa: BLE001 - the default figures stand regardless
        figures = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    finally:
        if saved is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = saved
    result["concurrent16"][name] = figures


def lsp(shape: str, device: str, data: Path | None, limit: int, result: dict) -> None:
    from benchmarks.typing_latency import bench_lsp, server_options

    holes = load_holes("single-line", limit, data)
    options = server_options(16, 8)  # two steps, as the CPU's typing benchmark
    run = asyncio.run(bench_lsp(holes, f"random:{shape}", options, device=device))
    result["lsp_typing_p50_ms"] = run["typing_p50_ms"]
    result["lsp"] = {key: run[key] for key in ("first_p50_ms", "first_p95_ms", "typing_p50_ms",
                                              "typing_p95_ms", "requests")}
    result["lsp"].update({"max_tokens": 16, "tokens_per_step": 8, "shape": shape,
                          "answered": sum(r["answered"] for r in run["rows"])})
    say(f"over LSP: after one typed character p50 {run['typing_p50_ms']:.0f} ms "
        f"(first request p50 {run['first_p50_ms']:.0f} ms)")


def block8b(device: str, holes: list[dict], result: dict) -> None:
    """The 8B block-diffusion shape (Stable-DiffCoder-8B = Seed-Coder-8B, random weights) at
    its card's settings: blocks of 4, threshold 0.95 (random weights pass it never, so one
    token a step: as its steps = gen_length setting), a 64-token hole (ends banned), the
    document's prompt rows cached exactly; ms a step against the bound of reading every
    weight and the context's keys/values once, beside the 7B Dream shape at one token a step
    (the speed section's hole64_7b, same run)."""
    shape = BLOCK_SHAPE["cuda" if device.startswith("cuda") else "cpu"]
    model = random_model_of_shape(shape, device, quantization="none")
    options = InfillOptions(max_tokens=HOLE_TOKENS, min_tokens=HOLE_TOKENS,
                            threshold=BLOCK_THRESHOLD)
    context = statistics.median(len(layout_ids(model, h["prompt"], h["suffix"])[0])
                                for h in holes)
    block = model.family.block_length
    bytes_read = bytes_per_hole_step(model, int(context) + HOLE_TOKENS // 2, block)
    card = card_bandwidth(model)
    by_path = {}
    for name, values in BLOCK_PATHS.items():  # side by side, each warmed up (captures) first
        with environment(values):
            if model.device.type == "cuda":
                fill(model, holes[0], options, None, None)  # warm-up: not timed
            by_path[name] = bench_options(model, holes[:BLOCK_PATH_HOLES], options)
    run = by_path["layer_loop"]
    steps = fast_step.block_steps(model)
    entry = {
        "shape": shape, "dtype": str(model.dtype), "block_length": block,
        "threshold": BLOCK_THRESHOLD, "hole_tokens": HOLE_TOKENS,
        "parameters": sum(p.numel() for p in model.network.parameters()),
        "context_tokens_p50": context, "bytes_per_step": bytes_read,
        "memory_bound_ms_per_step": bytes_read / card * 1e3 if card else None,
        **{key: value for key, value in run.items() if key != "step_kinds"},
        "by_path": {name: {k: path[k] for k in BLOCK_PATH_FIELDS}
                    for name, path in by_path.items()},
        "block_graphs": {"captures": steps.captures, "replays": steps.replays},
        "block_graphs_over_layer_loop": by_path["block_graphs"]["ms_per_step"]
        / run["ms_per_step"],
        "layer_loop_over_transformers": run["ms_per_step"]
        / by_path["transformers"]["ms_per_step"],
    }
    dream = result.get("hole64_7b", {}).get("by_tokens_per_step", {}).get("1")
    if dream:
        entry["dream7b_at_1"] = {k: dream[k] for k in ("ms_per_step", "tokens_per_s")}
        entry["tokens_per_s_over_dream7b_at_1"] = run["tokens_per_s"] / dream["tokens_per_s"]
    result["block8b"] = entry
    bound = entry["memory_bound_ms_per_step"]
    say(f"block8b ({shape}): {run['ms_per_step']:.2f} ms/step"
        + (f" (memory bound {bound:.2f})" if bound else "")
        + f", {run['tokens_per_s']:.0f} tokens/s, {run['steps']} steps"
        + (f"; Dream 7B at 1/step {dream['tokens_per_s']:.0f} tokens/s" if dream else "")
        + "; ms/step by path: " + ", ".join(f"{name} {path['ms_per_step']:.2f}"
                                             for name, path in by_path.items()))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def test_counts(junit: Path) -> dict:
    """passed / failed / skipped from pytest's JUnit XML."""
    if not junit.exists():
        return {"passed": 0, "failed": 0, "skipped": 0, "error": f"no {junit.name}"}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in
                                        ("tests", "failures", "errors", "skipped"))
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": tests - failures - errors - skipped, "failed": failures + errors,
            "skipped": skipped, "failed_names": failed}


# ---------------------------------------------------------------------------------------------
# the command


def say(line: str) -> None:
    print(f"gpu-check: {line}", flush=True)


def header(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "multiprocessors": props.multi_processor_count})
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(header(args.device))
    if args.junit:
        result["tests"] = test_counts(Path(args.junit))

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))

    data = Path(args.data) if args.data else None
    try:
        holes = load_holes("multi-line", args.holes, data) if args.sections else []
    except EvalDataMissing as error:
        result.setdefault("errors", {})["data"] = str(error)
        save()
        say(f"error: {error}")
        return 2
    save()
    model = None
    for section in filter(None, args.sections.split(",")):
        began = time.perf_counter()
        try:
            if section in MODEL_SECTIONS and model is None:
                model = random_model_of_shape(args.shape, args.device, quantization="none")
                say(f"built a random {args.shape} in {time.perf_counter() - began:.1f} s")
            if section == "speed":
                speed(model, holes, result)
            elif section == "switches":
                switch_runs(model, holes, result)
            elif section == "refresh":
                refresh_runs(model, holes, data, args.holes * BUNDLED_HOLES_PER_HOLE, result)
            elif section == "concurrent":
                concurrent(model, holes, result)
            elif section == "profile":
                profile_steps(model, holes, result)
            elif section == "block8b":
                model = None  # its own model: let the 7B one go first
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                block8b(args.device, holes, result)
            elif section in ("lsp", "quantization"):
                if model is not None:  # the server process (each scheme) loads its own
                    model = None
                    gc.collect()  # the model and its HoleSteps refer to each other
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                if section == "lsp":
                    lsp(args.shape, args.device, data, args.holes, result)
                else:
                    by_quantization(args.shape, args.device, holes, result)
            else:
                raise ValueError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
        except Exception as error:  # noqa: BLE001 - one section's failure keeps the others
            traceback.print_exc()
            result.setdefault("errors", {})[section] = f"{type(error).__name__}: {error}"
        result.setdefault("section_s", {})[section] = round(time.perf_counter() - began, 1)
        save()
    say(f"wrote {out}")
    if result.get("errors"):
        say(f"error: sections failed: {', '.join(result['errors'])} (gpu.json's errors)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS / "gpu.json"))
    parser.add_argument("--shape", default="qwen2.5-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", help="HumanEval-infilling folder (default ../shared/eval-data)")
    parser.add_argument("--holes", type=int, default=8, help="holes per measurement")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--junit", help="the CUDA tests' JUnit XML, counted into `tests`")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
