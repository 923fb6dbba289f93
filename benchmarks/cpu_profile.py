"""`diffusion-lsp bench cpu`: where a forward pass spends its time on this CPU, per dtype.

For a model (or a random-weight one of `--shape`) it times, side by side in one run, in
float32, bfloat16 and (where torch has it) int8 weights with dynamic activation quantisation
(`torch.ao.quantization.quantize_dynamic` on every Linear but the vocabulary head):

- a full pass over FULL_TOKENS tokens (the first step of a cold completion),
- a hole pass: HOLE_TOKENS queries against the cached keys/values of the rest (every later
  step, and a keystroke with the document's context cached),
- the vocabulary projection (lm_head) over HOLE_TOKENS rows,

and profiles the hole and full passes in the dtype `auto` picks (torch.profiler, top
operators by self CPU time). This is the measurement behind `model.catalog.cpu.auto_cpu_dtype`.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from transformers import DynamicCache

from benchmarks.report import machine, save
from model.catalog.cpu import cpu_flags, describe
from model.network.loader import LoadedModel
from model.network.shapes import random_model_of_shape

FULL_TOKENS = 320
HOLE_TOKENS = 16
REPEATS = 3
PROFILE_ROWS = 12
NAME = "cpu-profile"


def median_ms(run, repeats: int = REPEATS) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def passes(network: torch.nn.Module) -> dict:
    """The three timed operations on `network`, as zero-argument callables."""
    ids = torch.randint(0, network.config.vocab_size, (1, FULL_TOKENS))
    context = FULL_TOKENS - HOLE_TOKENS
    with torch.inference_mode():
        cache = DynamicCache()
        network.model(input_ids=ids, past_key_values=cache, use_cache=True)
        rows = [(layer.keys[..., :context, :].clone(), layer.values[..., :context, :].clone())
                for layer in cache.layers]
    hole, positions = ids[:, context:], torch.arange(context, FULL_TOKENS)[None]
    hidden = torch.randn(HOLE_TOKENS, network.config.hidden_size,
                         dtype=network.lm_head.weight.dtype)

    @torch.inference_mode()
    def full() -> None:
        out = network.model(input_ids=ids).last_hidden_state
        network.lm_head(out[:, -HOLE_TOKENS:])

    @torch.inference_mode()
    def hole_pass() -> None:
        out = network.model(input_ids=hole, position_ids=positions, use_cache=True,
                            past_key_values=DynamicCache(ddp_cache_data=rows)).last_hidden_state
        network.lm_head(out)

    @torch.inference_mode()
    def head() -> None:
        network.lm_head(hidden)

    return {"full": full, "hole": hole_pass, "lm_head": head}


def int8_network(network: torch.nn.Module) -> torch.nn.Module | None:
    """float32 `network` with int8 weights in every transformer Linear (dynamic quantisation);
    None where this torch has no `quantize_dynamic`."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return None
    return quantize_dynamic(copy.deepcopy(network.model), {torch.nn.Linear}, dtype=torch.qint8)


def time_dtypes(model: LoadedModel) -> list[dict]:
    rows = []
    network = model.network
    for dtype in (torch.float32, torch.bfloat16):
        network.to(dtype)
        timed = {name: median_ms(run) for name, run in passes(network).items()}
        rows.append({"dtype": str(dtype).removeprefix("torch."), **timed})
        print(f"{rows[-1]['dtype']:10} full {FULL_TOKENS} {timed['full']:7.0f} ms  "
              f"hole {HOLE_TOKENS} {timed['hole']:6.0f} ms  lm_head {timed['lm_head']:5.0f} ms",
              flush=True)
    network.to(torch.float32)
    quantised = int8_network(network)
    if quantised is not None:
        body, network.model = network.model, quantised
        try:
            timed = {name: median_ms(run) for name, run in passes(network).items()}
        finally:
            network.model = body
        rows.append({"dtype": "int8 dynamic (fp32 lm_head)", **timed})
        print(f"{'int8 dyn':10} full {FULL_TOKENS} {timed['full']:7.0f} ms  "
              f"hole {HOLE_TOKENS} {timed['hole']:6.0f} ms  lm_head {timed['lm_head']:5.0f} ms",
              flush=True)
    network.to(model.dtype)
    return rows


def time_threads(model: LoadedModel) -> list[dict]:
    """Hole and full pass in the model's dtype with 1, 2, ... threads up to torch's default
    (one per core), interleaved repeat by repeat so that a change in the machine's load hits
    every thread count alike: on a machine shared with other work, fewer threads can win."""
    default = torch.get_num_threads()
    counts = range(1, default + 1)
    runs = {name: run for name, run in passes(model.network).items() if name != "lm_head"}
    times: dict[int, dict[str, list[float]]] = {n: {name: [] for name in runs} for n in counts}
    try:
        for _ in range(REPEATS):
            for threads in counts:
                torch.set_num_threads(threads)
                for name, run in runs.items():
                    times[threads][name].append(median_ms(run, repeats=1))
    finally:
        torch.set_num_threads(default)
    rows = [{"threads": n, **{name: statistics.median(v) for name, v in times[n].items()}}
            for n in counts]
    for row in rows:
        print(f"{row['threads']} thread(s): full {row['full']:7.0f} ms  "
              f"hole {row['hole']:6.0f} ms", flush=True)
    return rows


def profile(model: LoadedModel) -> dict:
    """Top operators by self CPU time, for a hole pass and a full pass in the model's dtype."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for name, run in passes(model.network).items():
        if name == "lm_head":
            continue
        run()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        tables[name] = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
                         "share": e.self_cpu_time_total / total, "calls": e.count}
                        for e in events[:PROFILE_ROWS]]
    return tables


def run_cpu_bench(args) -> int:
    from model.network.load import load_for_cli

    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_model_of_shape(args.shape, "cpu") if args.shape else load_for_cli(args)
    rows = time_dtypes(model)
    threads = time_threads(model)
    tables = profile(model)
    for name, table in tables.items():
        print(f"{name} pass ({model.dtype}): " + ", ".join(
            f"{r['op'].removeprefix('aten::')} {r['share']:.0%}" for r in table[:6]))
    flags = cpu_flags()
    payload = {"machine": {**machine(), **describe(),
                           "bf16_flags": sorted(f for f in flags if "bf16" in f or "amx" in f)},
               "model": args.shape or str(model.path), "auto_dtype": str(model.dtype),
               "parameters": sum(p.numel() for p in model.network.parameters()),
               "full_tokens": FULL_TOKENS, "hole_tokens": HOLE_TOKENS,
               "milliseconds": rows, "threads": threads, "profile": tables}
    print(f"saved {save(f'{NAME}-{args.shape}' if args.shape else NAME, payload)}")
    return 0
