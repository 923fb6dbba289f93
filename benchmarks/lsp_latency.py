"""`diffusion-lsp bench lsp`: end-to-end latency through a real LSP client.

The server runs as its own process over stdio, exactly as an editor starts it; the client
(`benchmarks/lsp_client.py`, on pygls) opens one document per HumanEval-infilling hole
and asks for an inline completion at the hole, one request at a time, timing each from send to
answer. Afterwards, in this process and the same run, one bidirectional forward pass over each
request's context is timed, giving forward-pass equivalents (latency / one pass), a ratio that
survives noisy machines. The server's own `diffusion/stats` gives the time spent in the model,
so the share of the latency the model takes is reported too.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import torch

from benchmarks.model_speed import full_forward_ms
from benchmarks.report import (
    load_holes,
    machine,
    plot_cdf,
    publish,
    pyplot,
    save_figure,
)
from diffusion_contract.percentile import percentile

SPLITS = {"single-line": "never", "multi-line": "auto"}  # split -> completion.multiline


def hole_document(hole: dict) -> tuple[str, int, int]:
    """(text, line, character) of a document with the hole's middle removed and the cursor
    after the hole line's indentation, where a user would be typing."""
    middle = hole["canonical_solution"]
    indent = middle[: len(middle) - len(middle.lstrip(" \t"))]
    prefix = hole["prompt"] + indent
    lines = prefix.split("\n")
    return prefix + hole["suffix"], len(lines) - 1, len(lines[-1])


async def measure_split(split: str, holes: list[dict], model_path: str | None,
                        max_tokens: int, tokens_per_step: int | None = None,
                        previews: bool = False) -> dict:
    """One server, one request at a time. With `previews`, each hole is asked twice in a row,
    with `completion.preview` off and on (alternating which comes first), so that both see the
    same machine state: the cost of previews, measured in the same run."""
    from lsprotocol import types

    from benchmarks.lsp_client import open_document, plain, running_server, stats

    settings = {"completion": {"multiline": SPLITS[split], "maxTokens": max_tokens,
                               "maxTokensSingleLine": max_tokens}}
    if tokens_per_step:
        settings["completion"]["tokensPerStep"] = tokens_per_step
    if model_path:
        settings["model"] = {"path": model_path}
    rows = []
    async with running_server(settings) as client:
        received: list[dict] = []
        client.feature("diffusion/preview")(lambda params: received.append(plain(params)))
        for index, hole in enumerate(holes):
            modes = [None]
            if previews:
                modes = [False, True] if index % 2 == 0 else [True, False]
            for mode in modes:
                if mode is not None:
                    client.workspace_did_change_configuration(
                        types.DidChangeConfigurationParams(
                            settings={"completion": {"preview": mode}}))
                text, line, character = hole_document(hole)
                uri = f"untitled:bench-{split}-{index}-{mode}.py"
                open_document(client, uri, text)
                params = types.InlineCompletionParams(
                    text_document=types.TextDocumentIdentifier(uri=uri),
                    position=types.Position(line=line, character=character),
                    context=types.InlineCompletionContext(
                        trigger_kind=types.InlineCompletionTriggerKind.Automatic))
                before = len(received)
                began = time.perf_counter()
                result = await client.text_document_inline_completion_async(params)
                latency = (time.perf_counter() - began) * 1e3
                text_out = result.items[0].insert_text if result and result.items else ""
                row = {"task_id": hole["task_id"], "latency_ms": latency,
                       "completion": text_out, "document": text, "line": line,
                       "character": character}
                if mode is not None:
                    row.update(preview=mode, previews=len(received) - before)
                rows.append(row)
                client.text_document_did_close(types.DidCloseTextDocumentParams(
                    text_document=types.TextDocumentIdentifier(uri=uri)))
        server_stats = await stats(client)
    return {"split": split, "rows": rows, "server": server_stats}


def summarise(run: dict) -> dict:
    latencies = [r["latency_ms"] for r in run["rows"]]
    server = run["server"]
    model_p50 = server["modelMs"]["p50"]
    summary = {
        "split": run["split"], "requests": len(latencies),
        "latency_p50_ms": percentile(latencies, 50), "latency_p95_ms": percentile(latencies, 95),
        "server_latency_p50_ms": server["latencyMs"]["p50"], "model_p50_ms": model_p50,
        "model_share_p50": (model_p50 / percentile(latencies, 50)) if model_p50 else None,
        "mean_steps": server["meanSteps"],
        "empty": sum(1 for r in run["rows"] if not r["completion"]),
    }
    equivalents = [r["forward_pass_equivalents"] for r in run["rows"]
                   if "forward_pass_equivalents" in r]
    if equivalents:
        summary["forward_pass_equivalents_p50"] = statistics.median(equivalents)
        summary["forward_ms_p50"] = statistics.median(r["forward_ms"] for r in run["rows"])
    return summary


def preview_cost(run: dict) -> dict:
    """Latency with and without previews, over the same holes in the same server."""
    off = [r["latency_ms"] for r in run["rows"] if r.get("preview") is False]
    on = [r for r in run["rows"] if r.get("preview") is True]
    on_ms = [r["latency_ms"] for r in on]
    return {"split": run["split"], "pairs": len(on),
            "off_p50_ms": percentile(off, 50), "on_p50_ms": percentile(on_ms, 50),
            "off_p95_ms": percentile(off, 95), "on_p95_ms": percentile(on_ms, 95),
            "overhead_p50": percentile(on_ms, 50) / percentile(off, 50) - 1,
            "previews_per_request": statistics.mean(r["previews"] for r in on) if on else 0}


def run_lsp_bench(args) -> int:
    from lsp_server import context as ctx
    from lsp_server.settings import Settings
    from model.network.load import load_for_cli

    data = Path(args.data) if args.data else None
    runs = []
    for split in SPLITS:
        holes = load_holes(split, args.limit, data)
        runs.append(asyncio.run(measure_split(split, holes, args.model, args.max_tokens,
                                              args.tokens_per_step, args.preview)))
    # forward passes, in this process, after the server has exited (no contention)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_for_cli(args)
    budgets = Settings().context

    def count(text: str) -> int:
        return len(model.tokenizer.encode(text, add_special_tokens=False).ids)

    for run in runs:
        for row in run["rows"]:
            text = row.pop("document")
            cursor = ctx.locate(text, row["line"], row["character"])
            context = ctx.build_context(text, cursor, count, budgets)
            length = 1 + count(context.prefix) + 16 + count(context.suffix) + 1
            row["context_tokens"] = length
            row["forward_ms"] = full_forward_ms(model, length)
            row["forward_pass_equivalents"] = row["latency_ms"] / row["forward_ms"]
    summaries = [summarise(run) for run in runs]
    name = "lsp-latency" + (f"-tps{args.tokens_per_step}" if args.tokens_per_step else "")
    costs = [preview_cost(run) for run in runs] if args.preview else []
    if args.preview:
        name += "-previews"
    payload = {"machine": machine(), "model": str(model.path),
               "tokens_per_step": args.tokens_per_step or "threshold 0.9",
               "parameters": sum(p.numel() for p in model.network.parameters()),
               "summaries": summaries, "preview_cost": costs, "runs": runs}
    for c in costs:
        print(f"{c['split']:12} previews off p50 {c['off_p50_ms']:7.1f} ms, on p50 "
              f"{c['on_p50_ms']:7.1f} ms ({c['overhead_p50']:+.1%}); p95 {c['off_p95_ms']:.1f}"
              f" / {c['on_p95_ms']:.1f} ms; {c['previews_per_request']:.1f} previews a request")
    for s in summaries:
        share = f"{s['model_share_p50']:.0%}" if s["model_share_p50"] is not None else "-"
        print(f"{s['split']:12} over LSP: p50 {s['latency_p50_ms']:7.1f} ms  "
              f"p95 {s['latency_p95_ms']:7.1f} ms  model p50 {s['model_p50_ms']} ms "
              f"({share})  FPE p50 {s.get('forward_pass_equivalents_p50', 0):.2f}  "
              f"steps {s['mean_steps']}  empty {s['empty']}/{s['requests']}")
    publish(name, payload, lambda: plot(payload, name))
    return 0


def plot(payload: dict, name: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in payload["runs"]:
        plot_cdf(ax, run["rows"], run["split"])
    ax.set_xlabel("end-to-end latency over LSP (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"LSP latency — {payload['machine']['cpu']}"[:80])
    ax.legend(loc="best")
    return save_figure(plt, fig, name)
