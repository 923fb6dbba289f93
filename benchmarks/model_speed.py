"""Speed benchmarks of the model (no LSP): latency, throughput, and diffusion vs autoregressive.

Each prints a table, saves JSON (and a PNG plot when matplotlib is installed) under
benchmarks/results/, and names the machine it ran on. Every figure is a median over many
holes, and every ratio is measured side by side in the same run, because machines here are
noisy. Holes come from HumanEval-infilling (../shared/eval-data by default).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from benchmarks.report import (
    load_holes,
    machine,
    plot_cdf,
    publish,
    pyplot,
    save,
    save_figure,
)
from diffusion_contract.options import InfillOptions
from diffusion_contract.percentile import percentile
from model.decoding.hole import layout_ids
from model.decoding.sampler import infill
from model.engine import Engine
from model.network.loader import LoadedModel
from model.network.shapes import random_model_of_shape


@torch.inference_mode()
def full_forward_ms(model: LoadedModel, length: int, repeats: int = 3) -> float:
    """Median time of one forward pass over `length` tokens (the same network, bidirectional)."""
    ids = torch.full((1, length), model.ids.mask, dtype=torch.long, device=model.device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        hidden = model.network.model(input_ids=ids).last_hidden_state
        model.network.lm_head(hidden[:, -16:])
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def options_for(split: str, max_tokens: int, **overrides) -> InfillOptions:
    single = split == "single-line"
    return InfillOptions(max_tokens=max_tokens, single_line=single,
                         initial_tokens=16 if single else 32, **overrides)


# ---------------------------------------------------------------------------------------------
# latency (model only)


# the sampler as it ships, then with one speed-up turned off at a time (same holes, same run)
LATENCY_VARIANTS = {
    "default": {},
    "no context cache": {"reuse_context": False},
    "no end runs": {"end_runs": False},
}


def bench_latency(model: LoadedModel, holes: list[dict], split: str, max_tokens: int,
                  variant: str = "default") -> dict:
    options = options_for(split, max_tokens, **LATENCY_VARIANTS[variant])
    infill(model, holes[0]["prompt"], holes[0]["suffix"], options)  # warm-up
    rows = []
    for hole in holes:
        prefix_ids, suffix_ids = layout_ids(model, hole["prompt"], hole["suffix"])
        length = len(prefix_ids) + options.initial_tokens + len(suffix_ids)
        one_pass = full_forward_ms(model, length)
        began = time.perf_counter()
        result = infill(model, hole["prompt"], hole["suffix"], options)
        latency = (time.perf_counter() - began) * 1e3
        rows.append({"task_id": hole["task_id"], "text": result.text,
                     "latency_ms": latency, "steps": result.steps,
                     "full_passes": result.full_passes, "tokens": result.tokens,
                     "context_tokens": length, "forward_ms": one_pass,
                     "forward_pass_equivalents": latency / one_pass})
    return summarise(rows, split, variant, options)


def summarise(rows: list[dict], split: str, variant: str, options: InfillOptions) -> dict:
    latencies = [r["latency_ms"] for r in rows]
    tokens = sum(r["tokens"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    return {
        "split": split, "variant": variant, "reuse_context": options.reuse_context,
        "end_runs": options.end_runs, "holes": len(rows),
        "latency_p50_ms": percentile(latencies, 50), "latency_p95_ms": percentile(latencies, 95),
        "forward_pass_equivalents_p50": percentile(
            [r["forward_pass_equivalents"] for r in rows], 50),
        "steps_p50": percentile([r["steps"] for r in rows], 50),
        "tokens_per_step": tokens / max(steps, 1),
        "steps_per_token": steps / max(tokens, 1),
        "context_tokens_p50": percentile([r["context_tokens"] for r in rows], 50),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# throughput under concurrency


def bench_throughput(engine: Engine, holes: list[dict], max_tokens: int,
                     concurrency: list[int], tokens_per_step: int | None = None) -> dict:
    """Every hole is filled to exactly `max_tokens` real tokens (end tokens are banned), so
    tokens/s measures the engine, not how early a model chooses to stop. Closes `engine`."""
    options = options_for("single-line", max_tokens, min_tokens=max_tokens,
                          tokens_per_step=tokens_per_step)
    runs = []
    try:
        engine.submit(holes[0]["prompt"], holes[0]["suffix"], options).result()  # warm-up
        for n in concurrency:
            batch = [holes[i % len(holes)] for i in range(n)]
            began = time.perf_counter()
            requests = [engine.submit(h["prompt"], h["suffix"], options) for h in batch]
            results = [r.result(600) for r in requests]
            wall = time.perf_counter() - began
            latencies = [r.timings["total_ms"] for r in results]
            tokens = sum(r.tokens for r in results)
            runs.append({"concurrency": n, "wall_s": wall, "tokens": tokens,
                         "tokens_per_s": tokens / wall,
                         "latency_p50_ms": percentile(latencies, 50),
                         "latency_p95_ms": percentile(latencies, 95)})
    finally:
        engine.close()
    return {"runs": runs}


# ---------------------------------------------------------------------------------------------
# diffusion vs autoregressive, same network, same holes


def _set_causal(model: LoadedModel, causal: bool) -> None:
    model.network.config.is_causal = causal
    for module in model.network.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = causal


@torch.inference_mode()
def autoregressive_ms(model: LoadedModel, prefix: str, new_tokens: int,
                      warm: bool = False) -> float:
    """Time to decode `new_tokens` left to right (causal, KV cache, greedy) after `prefix`.
    `warm`: the prefix's keys/values are already cached (a prompt cache, as llama.cpp keeps
    across requests), so only the decoding is timed."""
    prefix_ids, _ = layout_ids(model, prefix, "")
    ids = torch.tensor([prefix_ids], device=model.device)
    _set_causal(model, True)
    try:
        cache = None
        if warm:
            cache = DynamicCache()
            model.network.model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        began = time.perf_counter()
        model.network.generate(ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, use_cache=True, pad_token_id=model.ids.pad,
                               eos_token_id=None, past_key_values=cache)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - began) * 1e3
    finally:
        _set_causal(model, False)


def bench_vs_autoregressive(model: LoadedModel, holes: list[dict], max_tokens: int,
                            tokens_per_step: int | None) -> dict:
    """Diffusion fills the hole with exactly `max_tokens` real tokens (end tokens banned, so the
    step count is fixed by `tokens_per_step`); AR decodes the same number after the same prefix.
    Each also warm: the context's keys/values cached beforehand (diffusion: the document's
    context, `model.decoding.prompt_cache`; AR: the prefix's), as while the user types."""
    from model.decoding.prompt_cache import PromptCache

    options = InfillOptions(max_tokens=max_tokens, initial_tokens=max_tokens,
                            tokens_per_step=tokens_per_step, min_tokens=max_tokens)
    rows = []
    autoregressive_ms(model, holes[0]["prompt"], 4)  # warm-up
    cache = PromptCache()
    for hole in holes:
        began = time.perf_counter()
        result = infill(model, hole["prompt"], hole["suffix"], options, cache=cache,
                        document=hole["task_id"])
        diffusion = (time.perf_counter() - began) * 1e3
        began = time.perf_counter()
        infill(model, hole["prompt"], hole["suffix"], options, cache=cache,
               document=hole["task_id"])
        diffusion_warm = (time.perf_counter() - began) * 1e3
        hole_tokens = max(result.tokens, 1)  # real tokens: end tokens are banned
        ar = autoregressive_ms(model, hole["prompt"], hole_tokens)
        ar_warm = autoregressive_ms(model, hole["prompt"], hole_tokens, warm=True)
        rows.append({"task_id": hole["task_id"], "tokens": hole_tokens,
                     "diffusion_ms": diffusion, "autoregressive_ms": ar,
                     "diffusion_warm_ms": diffusion_warm, "autoregressive_warm_ms": ar_warm,
                     "diffusion_tokens_per_s": hole_tokens / diffusion * 1e3,
                     "autoregressive_tokens_per_s": hole_tokens / ar * 1e3,
                     "speedup": ar / diffusion, "speedup_warm": ar_warm / diffusion_warm,
                     "steps": result.steps})
    return {
        "tokens_per_step": tokens_per_step, "max_tokens": max_tokens,
        "speedup_p50": percentile([r["speedup"] for r in rows], 50),
        "speedup_warm_p50": percentile([r["speedup_warm"] for r in rows], 50),
        "diffusion_warm_ms_p50": percentile([r["diffusion_warm_ms"] for r in rows], 50),
        "autoregressive_warm_ms_p50": percentile([r["autoregressive_warm_ms"] for r in rows], 50),
        "diffusion_tokens_per_s_p50": percentile([r["diffusion_tokens_per_s"] for r in rows], 50),
        "autoregressive_tokens_per_s_p50": percentile(
            [r["autoregressive_tokens_per_s"] for r in rows], 50),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# random-weight models of a published shape: model.network.shapes

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM memory bandwidth, vendor datasheets


def card_bandwidth(model: LoadedModel) -> float | None:
    """The datasheet memory bandwidth of the model's GPU (bytes/s); None off CUDA or unknown."""
    if model.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(model.device)
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)


def bandwidth_bound_ms(model: LoadedModel) -> float | None:
    """Time to read every weight once from GPU memory: the floor for one forward pass."""
    bandwidth = card_bandwidth(model)
    if bandwidth is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.network.parameters())
    return weight_bytes / bandwidth * 1e3


# ---------------------------------------------------------------------------------------------
# the plot and the command


def plot(name: str, payload: dict) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if name.startswith("latency"):
        for run in payload["runs"]:
            label = f"{run['split']}, {run['variant']}"
            plot_cdf(ax, run["rows"], label)
        ax.set_xlabel("latency per infill (ms)")
        ax.set_ylabel("fraction of holes")
    elif name.startswith("throughput"):
        runs = payload["runs"]
        ax.plot([r["concurrency"] for r in runs], [r["tokens_per_s"] for r in runs], "o-",
                label="tokens/s")
        ax2 = ax.twinx()
        ax2.plot([r["concurrency"] for r in runs], [r["latency_p95_ms"] for r in runs], "s--",
                 color="tab:red", label="p95 latency (ms)")
        ax2.set_ylabel("p95 latency (ms)")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("tokens/s")
    else:
        rows = payload["rows"]
        warm = [percentile([r["tokens"] / r[f"{side}_warm_ms"] * 1e3 for r in rows], 50)
                for side in ("diffusion", "autoregressive")]
        ax.bar(["diffusion", "autoregressive", "diffusion,\ncontext cached",
                "autoregressive,\nprefix cached"],
               [payload["diffusion_tokens_per_s_p50"], payload["autoregressive_tokens_per_s_p50"],
                *warm])
        ax.set_ylabel(f"tokens/s (median over {len(rows)} holes)")
    ax.set_title(f"{name} — {payload['machine']['cpu']}"[:80])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return save_figure(plt, fig, name)


# ---------------------------------------------------------------------------------------------
# cache agreement: how often the approximate context cache changes a completion


# the same hole in each mode: as shipped (dual cache), without the cache, and exact mode (the
# published algorithm: full passes, no early closing, a fixed-length hole)
AGREEMENT_MODES = {
    "default": {},
    "no context cache": {"reuse_context": False},
    "exact": {"exact": True},
}
# a reference setting (Dream's entropy with a step budget) with and without the cache
AGREEMENT_REFERENCE = {"algorithm": "entropy", "steps": 8}


def agreement_models(include_bundled: bool, workdir: Path) -> dict[str, LoadedModel]:
    """A tiny random checkpoint of every family (model/network/tiny.py), and the bundled model."""
    from model.network.families import FAMILIES
    from model.network.loader import bundled_model_path, load_model
    from model.network.tiny import write_tiny_model

    models = {f"tiny-{name}": load_model(write_tiny_model(workdir / name, family=name),
                                         device="cpu")
              for name in FAMILIES}
    if include_bundled and bundled_model_path() is not None:
        models["bundled"] = load_model(None, device="cpu")
    return models


def mode_options(split: str, max_tokens: int, mode: dict, reference: bool) -> InfillOptions:
    """As the language server asks (at least one token: an editor asked for text)."""
    extra = dict(AGREEMENT_REFERENCE) if reference else {}
    return options_for(split, max_tokens, min_tokens=1, **extra, **mode)


def bench_cache_agreement(model: LoadedModel, holes: list[dict], split: str,
                          max_tokens: int, reference: bool = False) -> dict:
    """Fill every hole in each mode; count how often a mode's text differs from no-cache."""
    texts: dict[str, list[str]] = {}
    paths: dict[str, list[list[list[int]]]] = {}
    passes: dict[str, list[int]] = {}
    for mode, overrides in AGREEMENT_MODES.items():
        options = mode_options(split, max_tokens, overrides, reference)
        results = [infill(model, h["prompt"], h["suffix"], options) for h in holes]
        texts[mode] = [r.text for r in results]
        paths[mode] = [[step.hole for step in r.trace] for r in results]
        passes[mode] = [r.steps for r in results]

    def differ(values: dict[str, list], mode: str, other: str) -> int:
        return sum(a != b for a, b in zip(values[mode], values[other], strict=True))

    return {
        "split": split, "holes": len(holes),
        "settings": AGREEMENT_REFERENCE if reference else "defaults",
        "empty_texts_no_cache": sum(not text for text in texts["no context cache"]),
        "modes": {
            mode: {"text_differs_from_no_cache": differ(texts, mode, "no context cache"),
                   "text_differs_from_exact": differ(texts, mode, "exact"),
                   "trajectory_differs_from_no_cache": differ(paths, mode, "no context cache"),
                   "forward_passes_mean": statistics.mean(passes[mode])}
            for mode in AGREEMENT_MODES
        },
    }


def run_cache_agreement(args) -> int:
    import tempfile

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else None
    with tempfile.TemporaryDirectory() as workdir:
        models = agreement_models(args.model is None, Path(workdir))
        if args.model is not None:
            from model.network.load import load_for_cli

            models[str(args.model)] = load_for_cli(args)
        runs = []
        for name, model in models.items():
            for split in ("single-line", "multi-line"):
                holes = load_holes(split, args.limit, data)
                for reference in (False, True):
                    run = bench_cache_agreement(model, holes, split, args.max_tokens, reference)
                    runs.append({"model": name, "family": model.family.name, **run})
                    modes = run["modes"]
                    default, plain = modes["default"], modes["no context cache"]
                    print(f"{name:14} {split:12} {'steps=8' if reference else 'defaults':9}"
                          f"cache changes text {default['text_differs_from_no_cache']:3}, "
                          f"trajectory {default['trajectory_differs_from_no_cache']:3}; "
                          f"text default != exact {default['text_differs_from_exact']:3}, "
                          f"no-cache != exact {plain['text_differs_from_exact']:3} "
                          f"(of {run['holes']}; {run['empty_texts_no_cache']} empty)",
                          flush=True)
    path = save("cache-agreement", {"machine": machine(), "max_tokens": args.max_tokens,
                                    "modes": AGREEMENT_MODES, "runs": runs})
    print(f"saved {path}")
    return 0


def run_bench(args) -> int:
    from model.network.load import load_for_cli

    if args.name == "cache-agreement":
        return run_cache_agreement(args)

    def load() -> LoadedModel:
        if args.threads:
            torch.set_num_threads(args.threads)
        return (random_model_of_shape(args.shape, args.device,
                                      quantization=args.quantization) if args.shape
                else load_for_cli(args))

    # the throughput benchmark runs the engine, which loads the model on its own thread as the
    # server does (Engine.start says why); the others run the model on this thread
    engine = Engine.start(load).result() if args.name == "throughput" else None
    model = engine.model if engine is not None else load()
    data = Path(args.data) if args.data else None
    header = {"machine": machine(), "model": str(model.path),
              "parameters": sum(p.numel() for p in model.network.parameters()),
              "device": model.device.type, "dtype": str(model.dtype),
              "forward_bandwidth_bound_ms": bandwidth_bound_ms(model)}
    if args.name == "latency":
        runs = []
        for split in ("single-line", "multi-line"):
            holes = load_holes(split, args.limit, data)
            for variant in LATENCY_VARIANTS:
                runs.append(bench_latency(model, holes, split, args.max_tokens, variant))
            default = [row["text"] for row in runs[-len(LATENCY_VARIANTS)]["rows"]]
            for run in runs[-len(LATENCY_VARIANTS):]:  # what a speed-up costs in output
                run["same_text_as_default"] = sum(
                    row["text"] == text for row, text in zip(run["rows"], default, strict=True))
        payload = {**header, "runs": runs}
        for run in runs:
            print(f"{run['split']:12} {run['variant']:16} "
                  f"p50 {run['latency_p50_ms']:7.1f} ms  p95 {run['latency_p95_ms']:7.1f} ms  "
                  f"FPE p50 {run['forward_pass_equivalents_p50']:.2f}  "
                  f"steps p50 {run['steps_p50']}  tokens/step {run['tokens_per_step']:.2f}  "
                  f"same text {run['same_text_as_default']}/{run['holes']}")
    elif args.name == "throughput":
        holes = load_holes("single-line", max(args.limit, 16), data)
        payload = {**header, **bench_throughput(engine, holes, args.max_tokens,
                                                [1, 2, 4, 8, 16], args.tokens_per_step)}
        for run in payload["runs"]:
            print(f"N={run['concurrency']:2}  {run['tokens_per_s']:8.1f} tokens/s  "
                  f"p50 {run['latency_p50_ms']:7.1f} ms  p95 {run['latency_p95_ms']:7.1f} ms")
    else:
        holes = load_holes("multi-line", args.limit, data)
        payload = {**header, **bench_vs_autoregressive(model, holes, args.max_tokens,
                                                        args.tokens_per_step)}
        print(f"diffusion {payload['diffusion_tokens_per_s_p50']:.1f} tokens/s, "
              f"autoregressive {payload['autoregressive_tokens_per_s_p50']:.1f} tokens/s, "
              f"speed-up p50 {payload['speedup_p50']:.2f}x; context cached: diffusion "
              f"{payload['diffusion_warm_ms_p50']:.0f} ms, autoregressive "
              f"{payload['autoregressive_warm_ms_p50']:.0f} ms, speed-up p50 "
              f"{payload['speedup_warm_p50']:.2f}x")
    name = f"{args.name}-{args.shape}" if args.shape else args.name  # one file per model
    publish(name, payload, lambda: plot(name, payload))
    return 0
