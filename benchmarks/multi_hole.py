"""`diffusion-lsp bench multi-hole`: several holes filled jointly vs one after another.

The set: HumanEval problems (from the single-line infilling split, whose records each remove
one line of a solution) with TWO separate, non-adjacent lines of one solution removed. Each
hole is a line's text after its indentation.

- joint: both holes masked in one sequence and denoised together (`model.decoding.multi_hole`), each
  seeing the other as it sharpens;
- sequential: the first hole filled with the second line missing, then the second with the
  first filled in (one hole at a time, as a left-to-right tool would).

Each fill is cut at its first line. Quality: exact match per hole, and pass@1 (the function
with both lines back passes HumanEval's tests, run in the sandbox). Speed: forward passes and
milliseconds per problem. The bundled model by default, `--model` for a real one, and
`--tiny-families` adds each family's tiny random checkpoint (their quality is noise: they show
that the harness runs every family, and what a pass costs).
"""

from __future__ import annotations

import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine, publish, split_path
from benchmarks.sandbox import run_programs

TINY_FAMILIES = ("default", "dream", "dreamon", "llada")
HOLE_TOKENS = 24  # each hole's budget (a line of HumanEval is well under this)


def problems(data: Path | None = None) -> dict[str, list[dict]]:
    """Single-line records grouped by problem (HumanEval/N), in file order."""
    with gzip.open(split_path("single-line", data), "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    grouped: dict[str, list[dict]] = {}
    for record in records:
        problem = "/".join(record["task_id"].split("/")[1:3])
        grouped.setdefault(problem, []).append(record)
    return grouped


def two_hole_task(problem: str, records: list[dict]) -> dict | None:
    """The problem's solution with two non-adjacent lines removed (at a third and two thirds
    of its removable lines), or None when it has no such pair."""
    first = min(records, key=lambda r: int(r["task_id"].rsplit("/L", 1)[1]))  # the first line
    text = first["prompt"] + first["canonical_solution"] + first["suffix"]
    body = first["prompt"].count("\n")  # the solution starts at the first removable line
    rows = text.split("\n")
    lines = [row for row in range(body, len(rows)) if rows[row].strip()]
    if len(lines) < 3:
        return None
    a, b = lines[len(lines) // 3], lines[2 * len(lines) // 3]
    if b - a < 2:
        b = next((line for line in lines if line - a >= 2), None)
        if b is None:
            return None
    starts = [0]
    for row in text.split("\n")[:-1]:
        starts.append(starts[-1] + len(row) + 1)
    holes, truths = [], []
    for row in (a, b):
        line = text.split("\n")[row]
        start = starts[row] + len(line) - len(line.lstrip(" \t"))
        holes.append((start, starts[row] + len(line)))
        truths.append(line.strip())
    return {"problem": problem, "text": text, "holes": holes, "truths": truths,
            "test": first["test"], "entry_point": first["entry_point"]}


def build_tasks(limit: int | None, data: Path | None = None) -> list[dict]:
    tasks = [t for p, rs in problems(data).items() if (t := two_hole_task(p, rs)) is not None]
    if limit is not None and limit < len(tasks):
        stride = len(tasks) / limit
        tasks = [tasks[int(i * stride)] for i in range(limit)]
    return tasks


def first_line(text: str) -> str:
    return text.strip("\n").split("\n", 1)[0].rstrip() if text.strip() else ""


def filled(task: dict, fills: list[str]) -> str:
    text, (h1, h2) = task["text"], task["holes"]
    return text[:h1[0]] + fills[0] + text[h1[1]:h2[0]] + fills[1] + text[h2[1]:]


def fill_joint(model, task: dict, options) -> tuple[list[str], int]:
    from model.decoding.multi_hole import infill_holes

    text, (h1, h2) = task["text"], task["holes"]
    # as the server's code action asks: no hole starts with blank space (the one-hole runs
    # ban an early newline the same way: single-line mode with min_tokens=1)
    result = infill_holes(model, [text[:h1[0]], text[h1[1]:h2[0]], text[h2[1]:]], options,
                          code_start=True)
    return [first_line(t) for t in result.texts], result.steps


def fill_sequential(model, task: dict, options) -> tuple[list[str], int]:
    from model.decoding.sampler import infill

    text, (h1, h2) = task["text"], task["holes"]
    one = infill(model, text[:h1[0]], text[h1[1]:h2[0]] + text[h2[1]:], options)
    a = first_line(one.text)
    two = infill(model, text[:h1[0]] + a + text[h1[1]:h2[0]], text[h2[1]:], options)
    return [a, first_line(two.text)], one.steps + two.steps


def evaluate(model, tasks: list[dict], name: str) -> dict:
    from dataclasses import replace

    from diffusion_contract.options import InfillOptions

    joint_options = InfillOptions(max_tokens=HOLE_TOKENS, min_tokens=1)
    line_options = replace(joint_options, single_line=True, initial_tokens=16)
    rows = []
    for task in tasks:
        row = {"problem": task["problem"], "truths": task["truths"]}
        for method, fill, options in (("joint", fill_joint, joint_options),
                                      ("sequential", fill_sequential, line_options)):
            began = time.perf_counter()
            fills, passes = fill(model, task, options)
            row[method] = {"fills": fills, "passes": passes,
                           "ms": (time.perf_counter() - began) * 1e3,
                           "exact": [f.strip() == t for f, t in zip(fills, task["truths"],
                                                                    strict=True)]}
        rows.append(row)
    programs = [filled(task, row[method]["fills"]) + "\n" + task["test"]
                + f"\ncheck({task['entry_point']})\n"
                for task, row in zip(tasks, rows, strict=True)
                for method in ("joint", "sequential")]
    outcomes = run_programs(programs)
    for index, row in enumerate(rows):
        row["joint"]["passed"] = outcomes[2 * index].passed
        row["sequential"]["passed"] = outcomes[2 * index + 1].passed
    summary = {"model": name, "problems": len(rows)}
    for method in ("joint", "sequential"):
        runs = [row[method] for row in rows]
        summary[method] = {
            "pass_at_1": sum(r["passed"] for r in runs) / len(runs),
            "holes_exact": sum(sum(r["exact"]) for r in runs) / (2 * len(runs)),
            "both_exact": sum(all(r["exact"]) for r in runs) / len(runs),
            "passes_mean": statistics.mean(r["passes"] for r in runs),
            "ms_p50": statistics.median(r["ms"] for r in runs),
        }
    return {"summary": summary, "rows": rows}


def models_to_run(args) -> list[tuple[str, object]]:
    from model.network.load import load_for_cli
    from model.network.loader import load_model
    from model.network.tiny import write_tiny_model

    loaded = [(str(args.model or "bundled"), load_for_cli(args))]
    if args.tiny_families:
        root = Path(tempfile.mkdtemp(prefix="multi-hole-tiny-"))
        for family in TINY_FAMILIES:
            path = write_tiny_model(root / family, family=family)
            loaded.append((f"tiny-{family}", load_model(path, device=args.device)))
    return loaded


def run_multi_hole_bench(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = build_tasks(args.limit, Path(args.data) if args.data else None)
    results = []
    for name, model in models_to_run(args):
        result = evaluate(model, tasks, name)
        results.append(result)
        s = result["summary"]
        for method in ("joint", "sequential"):
            m = s[method]
            print(f"{name:16} {method:10} pass@1 {m['pass_at_1']:6.1%}  holes exact "
                  f"{m['holes_exact']:6.1%}  both exact {m['both_exact']:6.1%}  passes "
                  f"{m['passes_mean']:5.1f}  p50 {m['ms_p50']:7.1f} ms  ({s['problems']} problems)")
    payload = {"machine": machine(), "hole_tokens": HOLE_TOKENS,
               "summaries": [r["summary"] for r in results], "results": results}
    publish("multi-hole", payload, lambda: None)
    return 0
