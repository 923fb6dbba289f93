"""`diffusion-lsp bench quantization`: 8- and 4-bit weights against the unquantized network.

Quality (`--part quality`), per model and scheme, over HumanEval-infilling single-line holes
(../shared/eval-data; the part is skipped, saying so, without them): top-1 agreement of the
first pass's predictions at the hole's masked positions, and the share of completions
identical to the unquantized model's (greedy, the server's single-line options). Models: the
bundled one (trained weights) and every family's tiny official-format checkpoint
(model/network/published.py: random weights, so their agreement is a lower bound).

Speed (`--part speed`): a random-weight model of `--shape` (default qwen2.5-0.5b,
Open-dCoder-0.5B's) in none / int8 / int4, the same weights quantized
(model.network.loader.quantized_copy), timed side by side in one run, taking turns hole by hole:
the first request on a document and the request after a typed character (the document's
context cached), 16-token holes at 4 tokens a step; ms a step is the typed request's latency
over its steps.

Run: `diffusion-lsp bench quantization [--part quality|speed] [--limit N]`
(JSON in benchmarks/results/quantization.json).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import EVAL_DATA, load_holes, machine, save
from benchmarks.typing_latency import hole_document, server_options
from diffusion_contract.options import InfillOptions
from model.catalog.cpu import describe
from model.decoding.passes import forward_holes
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import infill, new_state
from model.network.loader import LoadedModel, load_model, quantized_copy
from model.network.published import FAMILY_SPECS, write_checkpoint
from model.network.quantize import (
    CPU_INT8_WEIGHT_ONLY,
    INT4,
    INT8,
    NONE,
    kernel_for,
    torchao_version,
)
from model.network.shapes import random_model_of_shape

NAME = "quantization"
SCHEMES = (NONE, INT8, INT4)
WEIGHT_ONLY = "int8 weight-only"  # the CPU int8 kernel before fbgemm's, for comparison
SPEED_OPTIONS = InfillOptions(max_tokens=16, initial_tokens=16, tokens_per_step=4,
                              single_line=True, min_tokens=1)


def top1(model: LoadedModel, prefix: str, suffix: str) -> torch.Tensor:
    """The first pass's best token at each masked position of a fresh hole."""
    state = new_state(model, prefix, suffix, server_options())
    with torch.inference_mode():
        return forward_holes(model, [state])[0].argmax(-1).cpu()


def agreement(models: dict[str, LoadedModel], holes: list[dict]) -> dict[str, dict]:
    """Per scheme: top-1 agreement with `none` at masked positions and the share of identical
    completions, over `holes`."""
    reference = models[NONE]
    rows: dict[str, dict] = {s: {"positions": 0, "same_top1": 0, "holes": 0, "same_text": 0}
                             for s in models if s != NONE}
    for hole in holes:
        prefix, suffix, _ = hole_document(hole)
        want = top1(reference, prefix, suffix)
        text = infill(reference, prefix, suffix, server_options()).text
        for scheme, row in rows.items():
            got = top1(models[scheme], prefix, suffix)
            row["positions"] += want.numel()
            row["same_top1"] += int((got == want).sum())
            row["holes"] += 1
            row["same_text"] += int(infill(models[scheme], prefix, suffix,
                                           server_options()).text == text)
    for row in rows.values():
        row["top1_agreement"] = round(row["same_top1"] / max(row["positions"], 1), 4)
        row["same_completion"] = round(row["same_text"] / max(row["holes"], 1), 4)
    return rows


def quality(limit: int, data: Path | None) -> dict:
    """`agreement` for the bundled model and every family's tiny checkpoint, each loaded the
    ordinary way per scheme (load_model(quantization=...))."""
    try:
        holes = load_holes("single-line", limit, data)
    except FileNotFoundError as error:
        return {"skipped": f"no HumanEval-infilling data ({error})"}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = {"bundled": None}
        for name in FAMILY_SPECS:
            paths[f"tiny-{name}"] = write_checkpoint(Path(folder) / name, name)
        for label, path in paths.items():
            models = {s: load_model(path, device="cpu", quantization=s) for s in SCHEMES}
            results[label] = agreement(models, holes)
            print(label, results[label], flush=True)
    return {"holes": len(holes), "split": "single-line", "models": results}


def speed(shape: str, limit: int, data: Path | None) -> dict:
    """none / int8 / int4 of one random-weight model of `shape`, taking turns hole by hole."""
    base = random_model_of_shape(shape, "cpu", quantization=NONE)
    models = {NONE: base, INT8: quantized_copy(base, INT8), INT4: quantized_copy(base, INT4)}
    if base.device.type == "cpu" and kernel_for(INT8, base.device) is not CPU_INT8_WEIGHT_ONLY:
        models[WEIGHT_ONLY] = quantized_copy(base, INT8, CPU_INT8_WEIGHT_ONLY)
    try:
        holes = load_holes("single-line", limit, data)
        documents = [hole_document(h) for h in holes]
    except FileNotFoundError:
        documents = [("def f(x):\n    " * 20, "\n    return y\n", "y")] * limit
    times: dict[str, dict[str, list[float]]] = {s: {"first_ms": [], "typing_ms": [],
                                                     "ms_per_step": []} for s in models}
    caches = {s: PromptCache(max_documents=4) for s in models}
    for scheme, model in models.items():  # warm-up
        infill(model, *documents[0][:2], SPEED_OPTIONS)
        del scheme
    for index, (prefix, suffix, typed) in enumerate(documents):
        for scheme, model in models.items():
            began = time.perf_counter()
            infill(model, prefix, suffix, SPEED_OPTIONS, cache=caches[scheme],
                   document=str(index))
            first = (time.perf_counter() - began) * 1e3
            began = time.perf_counter()
            result = infill(model, prefix + typed, suffix, SPEED_OPTIONS, cache=caches[scheme],
                            document=str(index))
            typing = (time.perf_counter() - began) * 1e3
            times[scheme]["first_ms"].append(first)
            times[scheme]["typing_ms"].append(typing)
            times[scheme]["ms_per_step"].append(typing / max(result.steps, 1))
    rows = {}
    for scheme, series in times.items():
        rows[scheme] = {key: round(statistics.median(values), 1)
                        for key, values in series.items()}
        rows[scheme]["dtype"] = str(models[scheme].dtype).removeprefix("torch.")
        kernel = (CPU_INT8_WEIGHT_ONLY if scheme == WEIGHT_ONLY
                  else kernel_for(scheme, models[scheme].device))
        rows[scheme]["kernel"] = kernel.description if kernel else "none"
    for scheme in rows:
        if scheme == NONE:
            continue
        rows[scheme]["typing_vs_none"] = round(rows[scheme]["typing_ms"]
                                               / rows[NONE]["typing_ms"], 2)
    print(rows, flush=True)
    return {"shape": shape, "holes": len(documents), "options": "16-token holes, 4 tokens a "
            "step, single line", "schemes": rows}


def run_quantization_bench(args) -> int:
    part = getattr(args, "part", None) or "both"
    data = Path(args.data) if args.data else None
    payload = {"machine": machine(), "cpu": describe(), "torch": torch.__version__,
               "torchao": torchao_version(), "eval_data": str(data or EVAL_DATA),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if part in ("both", "speed"):
        payload["speed"] = speed(args.shape or "qwen2.5-0.5b", args.limit, data)
    if part in ("both", "quality"):
        payload["quality"] = quality(args.limit, data)
    print(save(NAME if part == "both" else f"{NAME}-{part}", payload))
    return 0
