"""`diffusion-lsp bench typing`: what a keystroke costs, with each document's context kept.

For every HumanEval-infilling single-line hole, a document is opened with the cursor after the
hole line's indentation (where a user would be typing), one completion is asked for (the first
request on a newly opened file: nothing cached), then the user types the hole's first character
and a completion is asked for again (while typing: the document's context is cached). Measured
twice, side by side in one run:

- over LSP: the server as its own process over stdio, timed from send to answer;
- model only, in this process: the same two requests with the document cache, plus the typed
  request without it (the cache's effect on the text: how many completions are the same).

Random weights are never confident, so a hole would take as many steps as it has tokens:
`--max-tokens 16 --tokens-per-step 8` fixes the work at two steps, about what the bundled
model's single-line holes take (2.1 over LSP). Also: the bytes that 20 documents' cached
contexts take, and one full pass over a typical
context for scale. With `--shape`, a random-weight checkpoint of that published shape is
written to a temporary folder first (so the server and this process load the same weights the
ordinary way, dtype `auto` included). Its tokenizer is the bundled model's code BPE (8,192
pieces) with the dream family's special tokens added: a real code tokenizer, so contexts have a
realistic number of tokens; the weights are noise, so the completions' text is too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.model_speed import full_forward_ms
from benchmarks.report import (
    load_holes,
    machine,
    plot_cdf,
    publish,
    pyplot,
    save_figure,
)
from diffusion_contract.options import InfillOptions
from diffusion_contract.percentile import percentile
from model.catalog.cpu import describe
from model.decoding.hole import layout_ids
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import infill
from model.network.families import DREAM
from model.network.loader import TOKENIZER_FILE, LoadedModel, load_model
from model.network.shapes import SHAPES, random_model_of_shape

DOCUMENTS_FOR_MEMORY = 20  # the "20 open documents"
SINGLE_LINE_TOKENS = 32  # the server's completion.maxTokensSingleLine default
NAME = "typing"
INLINE_EDIT = "textDocument/copilotInlineEdit"  # what the editors ask after every change
ONE_STEP = InfillOptions(max_tokens=1, initial_tokens=1, tokens_per_step=1)  # caches a document


def hole_document(hole: dict) -> tuple[str, str, str]:
    """(prefix, suffix, typed): the cursor after the hole line's indentation, and the first
    character the user types there."""
    middle = hole["canonical_solution"]
    body = middle.lstrip(" \t")
    indent = middle[: len(middle) - len(body)]
    return hole["prompt"] + indent, hole["suffix"], body[:1] or " "


def server_options(max_tokens: int = SINGLE_LINE_TOKENS,
                   tokens_per_step: int | None = None) -> InfillOptions:
    """What the language server's LocalBackend asks for a single-line hole."""
    return InfillOptions(max_tokens=max_tokens, initial_tokens=min(16, max_tokens),
                         single_line=True, min_tokens=1, tokens_per_step=tokens_per_step)


# ---------------------------------------------------------------------------------------------
# a checkpoint of a published shape


def write_shape_checkpoint(shape: str, directory: Path) -> Path:
    """A dream-family checkpoint of `shape` with random weights in `directory` (see module):
    `model.network.shapes`' model of that shape, saved as the loader reads it."""
    model = random_model_of_shape(shape, "cpu")
    tied = model.network.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.network.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(
        {"tie_word_embeddings": False, **SHAPES[shape], "model_type": "Dream",
         "diffusion_lsp_family": DREAM.name, "shape": shape}, indent=2))
    model.tokenizer.save(str(directory / TOKENIZER_FILE))
    return directory


# ---------------------------------------------------------------------------------------------
# model only


def _timed(model: LoadedModel, prefix: str, suffix: str, options: InfillOptions,
           **cache) -> tuple[dict, float]:
    began = time.perf_counter()
    result = infill(model, prefix, suffix, options, **cache)
    latency = (time.perf_counter() - began) * 1e3
    return {"text": result.text, "steps": result.steps, "full_passes": result.full_passes,
            "reused_tokens": result.reused_tokens}, latency


def bench_model(model: LoadedModel, holes: list[dict], options: InfillOptions | None = None,
                extra_holes: list[dict] | None = None) -> dict:
    """First request on a new document, the request after one typed character (cache warm),
    and that request without the cache, per hole; and the cache's bytes once 20 documents are
    open (`extra_holes` open more documents, one pass each, when `holes` are fewer)."""
    options = options or server_options()
    cache = PromptCache(max_documents=DOCUMENTS_FOR_MEMORY)
    _timed(model, *hole_document(holes[0])[:2], options)  # warm-up
    rows = []
    for index, hole in enumerate(holes):
        prefix, suffix, typed = hole_document(hole)
        document = f"doc-{index}"
        first, first_ms = _timed(model, prefix, suffix, options, cache=cache,
                                 document=document)
        warm, warm_ms = _timed(model, prefix + typed, suffix, options, cache=cache,
                               document=document)
        cold, cold_ms = _timed(model, prefix + typed, suffix, options)
        prefix_ids, suffix_ids = layout_ids(model, prefix + typed, suffix)
        rows.append({"task_id": hole["task_id"],
                     "context_tokens": len(prefix_ids) + len(suffix_ids),
                     "first_ms": first_ms, "typing_ms": warm_ms, "typing_no_cache_ms": cold_ms,
                     "first": first, "typing": warm, "typing_no_cache": cold,
                     "same_text": warm["text"] == cold["text"]})
    for index, hole in enumerate(extra_holes or []):  # open documents up to 20, for memory
        if len(cache) >= DOCUMENTS_FOR_MEMORY:
            break
        prefix, suffix, _ = hole_document(hole)
        infill(model, prefix, suffix, ONE_STEP, cache=cache, document=f"extra-{index}")
    contexts = [r["context_tokens"] for r in rows]
    length = int(statistics.median(contexts)) + 16
    return {
        "holes": len(rows),
        "first_p50_ms": percentile([r["first_ms"] for r in rows], 50),
        "typing_p50_ms": percentile([r["typing_ms"] for r in rows], 50),
        "typing_p95_ms": percentile([r["typing_ms"] for r in rows], 95),
        "typing_no_cache_p50_ms": percentile([r["typing_no_cache_ms"] for r in rows], 50),
        "speedup_p50": statistics.median(r["typing_no_cache_ms"] / r["typing_ms"] for r in rows),
        "same_text": sum(r["same_text"] for r in rows),
        "reused_share_p50": statistics.median(
            r["typing"]["reused_tokens"] / r["context_tokens"] for r in rows),
        "steps_p50": percentile([r["typing"]["steps"] for r in rows], 50),
        "context_tokens_p50": percentile(contexts, 50),
        "full_pass_ms": full_forward_ms(model, length),
        "full_pass_tokens": length,
        "cached_documents": len(cache),
        "cache_bytes": cache.nbytes,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# over LSP


async def bench_lsp(holes: list[dict], model_path: str | None, options: InfillOptions,
                    device: str = "auto", next_edits: bool = False,
                    against: Path | None = None, quantization: str = "auto") -> dict:
    """The same two requests per hole, through a real LSP client and the server process. With
    `next_edits`, the typed character also asks for a next edit first, as the editors' clients
    do after every change, and the completion is timed while it is in flight. With `against`
    (another source checkout), its server runs beside this one and gets every hole right
    after it, so that both see the same load: `against` holds its figures."""
    from benchmarks.lsp_client import running_server, stats

    settings = {"completion": {"multiline": "never", "maxTokensSingleLine": options.max_tokens,
                               "tokensPerStep": options.tokens_per_step}}
    settings["model"] = {"device": device, "quantization": quantization}
    if model_path:
        settings["model"]["path"] = model_path
    checkouts = {"this": None} if against is None else {"this": None, "against": against}
    rows: dict[str, list[dict]] = {name: [] for name in checkouts}
    servers: dict[str, dict] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = {name: await stack.enter_async_context(running_server(settings,
                                                                         checkout=checkout))
                   for name, checkout in checkouts.items()}
        for index, hole in enumerate(holes):
            for name, client in clients.items():
                rows[name].append(await type_one(client, index, hole, next_edits))
        for name, client in clients.items():
            servers[name] = await stats(client)
    summaries = {name: summary(rows[name], servers[name], next_edits) for name in checkouts}
    result = summaries["this"]
    if against is not None:
        result["against"] = {"checkout": str(against), **summaries["against"]}
    return result


async def type_one(client, index: int, hole: dict, next_edits: bool) -> dict:
    """One hole: open it, ask (first request), type a character, ask again (timed)."""
    from benchmarks.lsp_client import edit, inline, open_document

    prefix, suffix, typed = hole_document(hole)
    lines = prefix.split("\n")
    line, character = len(lines) - 1, len(lines[-1])
    uri = f"untitled:typing-{index}.py"
    open_document(client, uri, prefix + suffix)
    began = time.perf_counter()
    await inline(client, uri, line, character)
    first = (time.perf_counter() - began) * 1e3
    edit(client, uri, 2, line, character, typed)
    asked = asyncio.ensure_future(client.protocol.send_request_async(
        INLINE_EDIT, {"textDocument": {"uri": uri, "version": 2}, "position": {
            "line": line, "character": character + len(typed)}})) if next_edits else None
    began = time.perf_counter()
    answer = await inline(client, uri, line, character + len(typed))
    typing = (time.perf_counter() - began) * 1e3
    if asked is not None:
        await asked
    items = answer.items if answer is not None and hasattr(answer, "items") else answer
    return {"task_id": hole["task_id"], "first_ms": first, "typing_ms": typing,
            "answered": bool(items)}


def summary(rows: list[dict], server: dict, next_edits: bool) -> dict:
    return {
        "requests": 2 * len(rows),
        "next_edits": next_edits,
        "first_p50_ms": percentile([r["first_ms"] for r in rows], 50),
        "first_p95_ms": percentile([r["first_ms"] for r in rows], 95),
        "typing_p50_ms": percentile([r["typing_ms"] for r in rows], 50),
        "typing_p95_ms": percentile([r["typing_ms"] for r in rows], 95),
        "server": server,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# the command


def run_typing_bench(args) -> int:
    from model.network.load import load_for_cli

    holes = load_holes("single-line", args.limit, Path(args.data) if args.data else None)
    options = server_options(args.max_tokens, args.tokens_per_step)
    with tempfile.TemporaryDirectory(prefix="diffusion-lsp-shape-") as scratch:
        model_path = args.model
        if args.shape:
            began = time.perf_counter()
            model_path = str(write_shape_checkpoint(args.shape, Path(scratch) / args.shape))
            print(f"wrote a random {args.shape} checkpoint in {time.perf_counter() - began:.0f} s")
        # over LSP first, while this process holds no model (no contention for the cores)
        against = getattr(args, "against", None)
        lsp = asyncio.run(bench_lsp(holes, model_path, options,
                                    next_edits=getattr(args, "next_edits", False),
                                    against=Path(against) if against else None,
                                    quantization=args.quantization))
        for label, figures in (("over LSP", lsp), (f"  {against}", lsp.get("against"))):
            if figures is not None:
                print(f"{label:<11} first request p50 {figures['first_p50_ms']:7.0f} ms   "
                      f"while typing p50 {figures['typing_p50_ms']:7.0f} ms "
                      f"(p95 {figures['typing_p95_ms']:.0f})")
        if args.threads:
            torch.set_num_threads(args.threads)
        if model_path:
            model = load_model(model_path, device=args.device, dtype=args.dtype,
                               quantization=args.quantization)
        else:
            model = load_for_cli(args)
        more = load_holes("single-line", DOCUMENTS_FOR_MEMORY,
                          Path(args.data) if args.data else None)[len(holes):]
        only = bench_model(model, holes, options, more)
    print(f"model only  first request p50 {only['first_p50_ms']:7.0f} ms   "
          f"while typing p50 {only['typing_p50_ms']:7.0f} ms, without the cache "
          f"{only['typing_no_cache_p50_ms']:.0f} ms ({only['speedup_p50']:.1f}x); same text "
          f"{only['same_text']}/{only['holes']}; {only['cached_documents']} documents' caches "
          f"{only['cache_bytes'] / 2**20:.0f} MiB")
    payload = {"machine": {**machine(), **describe()}, "model": args.shape or str(model.path),
               "parameters": sum(p.numel() for p in model.network.parameters()),
               "dtype": str(model.dtype), "max_tokens": options.max_tokens,
               "tokens_per_step": options.tokens_per_step, "lsp": lsp, "model_only": only}
    name = f"{NAME}-{args.shape}" if args.shape else NAME  # one file per model
    name += "-next-edits" if lsp["next_edits"] else ""
    publish(name, payload, lambda: plot(payload, name))
    return 0


def plot(payload: dict, name: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    lsp, only = payload["lsp"]["rows"], payload["model_only"]["rows"]
    plot_cdf(ax, [{"latency_ms": r["first_ms"]} for r in lsp], "over LSP, first request")
    plot_cdf(ax, [{"latency_ms": r["typing_ms"]} for r in lsp], "over LSP, while typing")
    plot_cdf(ax, [{"latency_ms": r["typing_no_cache_ms"]} for r in only],
             "model only, typed, no document cache")
    plot_cdf(ax, [{"latency_ms": r["typing_ms"]} for r in only], "model only, while typing")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{payload['model']} ({payload['dtype']}) — {payload['machine']['cpu']}"[:80])
    ax.legend(loc="best")
    return save_figure(plt, fig, name)
