"""HumanEval-infilling (Bavarian et al., 2022): pass@1 and exact match of one greedy infill.

For every task the model fills the hole between `prompt` and `suffix` (cut to token budgets
by `lsp_server.context`, the cutter the language server uses); the program `prompt +
completion + suffix + test + check(entry_point)` then runs in a sandboxed subprocess
(`benchmarks.sandbox`), never in this
process. Holes are batched through the engine (all submitted, then collected), and each
program starts as soon as its completion is ready. A few holes first run alone, to measure the
latency of one infill.

Every middle of this benchmark is whole lines ending in a newline. The single-line sampler
stops at the newline and drops it, so a completion that does not end in a newline gets one
back before it is put between prompt and suffix (what an editor does when a line completion is
accepted above an existing line).

    diffusion-lsp eval humaneval-infilling --split single-line [--limit N] [--data DIR]
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import statistics
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.report import EvalDataMissing, missing_data
from benchmarks.sandbox import DEFAULT_TIMEOUT_S, DEFAULT_WORKERS, Outcome, run_program
from lsp_server.context import cut_prefix, cut_suffix

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA_SUBDIR = Path("shared") / "eval-data" / "humaneval-infilling"
SPLIT_FILES = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl",
}
MAX_TOKENS = {"single-line": 32, "multi-line": 64}  # longest completion, in tokens
INITIAL_TOKENS = {"single-line": 16, "multi-line": 32}  # first guess of the hole's length
PREFIX_TOKENS = 256  # the bundled model was trained on 384-token sequences:
SUFFIX_TOKENS = 64  # prefix + suffix + the longest hole fit in that
LATENCY_SAMPLE = 20  # holes run alone, one at a time, to measure the latency of one infill
MAX_BATCH = 16


EvalDataError = EvalDataMissing  # the benchmark's data files are not where they were looked for


# ---------------------------------------------------------------------------------------------
# Data


def data_candidates() -> list[Path]:
    """Where the data is looked for without --data: ../shared next to the repo and the cwd."""
    candidates = [REPO.parent / DATA_SUBDIR, Path.cwd().parent / DATA_SUBDIR,
                  Path.cwd() / DATA_SUBDIR]
    unique: list[Path] = []
    for path in candidates:
        if path.resolve() not in [u.resolve() for u in unique]:
            unique.append(path)
    return unique


def split_file(split: str, data: Path | None = None) -> Path:
    """The split's file (`.jsonl.gz`, or plain `.jsonl`) in `data` or the default places."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_FILES)}")
    folders = [Path(data)] if data is not None else data_candidates()
    for folder in folders:
        for name in (SPLIT_FILES[split] + ".gz", SPLIT_FILES[split]):
            if (folder / name).exists():
                return folder / name
    looked = ", ".join(str(f) for f in folders)
    raise missing_data(looked)


def load_tasks(split: str, limit: int | None = None, data: Path | None = None) -> tuple[
        list[dict], int, Path]:
    """(tasks, records in the split, file). With `limit`, evenly spaced records, so that a
    sample covers every problem rather than the first few."""
    path = split_file(split, data)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if limit is None or limit >= len(records):
        return records, len(records), path
    stride = len(records) / limit
    return [records[int(i * stride)] for i in range(limit)], len(records), path


def program_of(task: dict, completion: str) -> str:
    """The program that passes when the completion is right."""
    return (task["prompt"] + completion + task["suffix"] + "\n" + task["test"]
            + f"\ncheck({task['entry_point']})\n")


def as_lines(completion: str) -> str:
    """The middle as whole lines: the newline the single-line sampler drops, put back."""
    return completion if completion.endswith("\n") else completion + "\n"


def exact_match(completion: str, task: dict) -> bool:
    return completion.strip() == task["canonical_solution"].strip()


# ---------------------------------------------------------------------------------------------
# Running


def infill_options(split: str, max_tokens: int | None = None):
    """As the language server asks: every middle is at least one token (min_tokens=1), since
    no task's missing lines are empty."""
    from diffusion_contract.options import InfillOptions

    return InfillOptions(max_tokens=max_tokens or MAX_TOKENS[split],
                         initial_tokens=min(INITIAL_TOKENS[split], max_tokens or 10**9),
                         single_line=split == "single-line", min_tokens=1)


def model_context(model, task: dict) -> tuple[str, str]:
    """The prefix and suffix the model sees for `task`."""
    def count(text: str) -> int:
        return len(model.tokenizer.encode(text, add_special_tokens=False).ids) if text else 0

    return (cut_prefix(task["prompt"], PREFIX_TOKENS, count),
            cut_suffix(task["suffix"], SUFFIX_TOKENS, count))


def evaluate(model, tasks: list[dict], options, timeout_s: float = DEFAULT_TIMEOUT_S,
             workers: int = DEFAULT_WORKERS, latency_sample: int = LATENCY_SAMPLE,
             progress=None, engine=None) -> list[dict]:
    """One record per task, in order: completion, outcome, exact match, steps, timings.

    `engine` serves `model` (made here when None; closed at the end either way).
    `progress(kind)` is called with "infill" or "test" as each finishes.
    """
    from model.engine import Engine

    engine = engine or Engine(model, max_batch=MAX_BATCH, warm_up=True)
    records: list[dict | None] = [None] * len(tasks)
    tests: dict[Future, int] = {}
    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def finished(index: int, result, alone: bool) -> None:
                task = tasks[index]
                completion = as_lines(result.text)
                records[index] = {
                    "task_id": task["task_id"], "completion": completion,
                    "exact_match": exact_match(completion, task), "steps": result.steps,
                    "full_passes": result.full_passes, "tokens": result.tokens,
                    "finish_reason": result.finish_reason, "alone": alone,
                    "latency_ms": round(result.timings["total_ms"], 2),
                    "forward_ms": round(result.timings["forward_ms"], 2)}
                tests[pool.submit(run_program, program_of(task, completion), timeout_s)] = index
                if progress is not None:
                    progress("infill")

            alone = min(latency_sample, len(tasks))
            for index in range(alone):  # one at a time: the latency of a single infill
                prefix, suffix = model_context(model, tasks[index])
                finished(index, engine.submit(prefix, suffix, options).result(), True)
            pending = {}
            for index in range(alone, len(tasks)):  # all at once: the engine batches them
                prefix, suffix = model_context(model, tasks[index])
                pending[engine.submit(prefix, suffix, options).future] = index
            for future in as_completed(pending):
                finished(pending[future], future.result(), False)
            infill_seconds = time.perf_counter() - began
            for future in as_completed(list(tests)):
                outcome: Outcome = future.result()
                record = records[tests[future]]
                record.update(passed=outcome.passed, outcome=outcome.status,
                              error=outcome.error, test_seconds=round(outcome.seconds, 3))
                if progress is not None:
                    progress("test")
    finally:
        engine.close()
    for record in records:
        record["infill_wall_s"] = round(infill_seconds, 2)
    return records


def summarise(records: list[dict], records_in_split: int) -> dict:
    alone = [r for r in records if r["alone"]] or records
    tasks = len(records)
    passed = sum(r["passed"] for r in records)
    wall = records[0]["infill_wall_s"] if records else 0.0
    return {
        "tasks": tasks, "records_in_split": records_in_split, "passed": passed,
        "pass_at_1": passed / max(tasks, 1),
        "exact_match": sum(r["exact_match"] for r in records) / max(tasks, 1),
        # a blank middle still passes the few tasks whose missing lines the tests do not reach
        "empty_completions": sum(not r["completion"].strip() for r in records),
        "steps_p50": statistics.median(r["steps"] for r in records) if records else 0,
        "tokens_p50": statistics.median(r["tokens"] for r in records) if records else 0,
        "latency_p50_ms": statistics.median(r["latency_ms"] for r in alone) if records else 0,
        "latency_alone_holes": len(alone),
        "infill_wall_s": wall, "holes_per_s": tasks / wall if wall else 0.0,
        "outcomes": dict(Counter(r["outcome"] for r in records)),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
        "errors_top": dict(Counter(r["error"].split(":")[0] for r in records
                                   if r["error"]).most_common(8)),
    }


# ---------------------------------------------------------------------------------------------
# Reporting


def machine() -> dict:
    from benchmarks.report import machine as bench_machine

    info = bench_machine()
    info["cpus"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work sharing the CPU
    return info


def weights_sha256(path: Path) -> str | None:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def training_of(path: Path) -> dict | None:
    """The exported training state of a bundled-style model directory, when it has one."""
    log = Path(path) / "train_log.json"
    if not log.exists():
        return None
    summary = json.loads(log.read_text())
    return {"run": summary.get("run"), "checkpoint": summary.get("checkpoint"),
            **summary.get("state", {})}


def plot(payload: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary, records = payload["summary"], payload["records"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["pass@1", "exact match", "empty completion"]
    values = [summary["pass_at_1"] * 100, summary["exact_match"] * 100,
              summary["empty_completions"] / max(summary["tasks"], 1) * 100]
    bars = left.bar(names, values, color=["tab:green", "tab:blue", "tab:grey"])
    left.bar_label(bars, fmt="%.1f%%")
    left.set_ylim(0, 50 if max(values) <= 40 else 110)
    left.set_ylabel(f"% of {summary['tasks']} tasks ({payload['selection']})", fontsize=8)
    steps_all = [r["steps"] for r in records]
    steps_passed = [r["steps"] for r in records if r["passed"]]
    bins = range(0, max(steps_all, default=1) + 2)
    right.hist(steps_all, bins=bins, label="all", color="tab:grey")
    if steps_passed:
        right.hist(steps_passed, bins=bins, label="passed", color="tab:green")
    right.set_xlabel("forward passes per infill")
    right.set_ylabel("tasks")
    right.legend(loc="best")
    right.set_title(f"latency p50 {summary['latency_p50_ms']:.0f} ms (one infill alone)",
                    fontsize=9)
    fig.suptitle(f"HumanEval-infilling {payload['split']} — {Path(payload['model']).name} "
                 f"({payload['parameters'] / 1e6:.1f}M params, {payload['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_eval(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from model.engine import Engine
    from model.network.load import load_for_cli
    from model.network.loader import ModelLoadError

    console = Console(stderr=True)
    try:
        tasks, in_split, data_file = load_tasks(args.split, args.limit,
                                                Path(args.data) if args.data else None)
    except EvalDataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    def load():
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return load_for_cli(args)

    try:  # loaded and run on the engine's thread, as the server does (Engine.start says why)
        engine = Engine.start(load, max_batch=MAX_BATCH).result()
    except (ModelLoadError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    model = engine.model
    options = infill_options(args.split, args.max_tokens)
    timeout_s = float(getattr(args, "timeout", None) or DEFAULT_TIMEOUT_S)
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        bars = {"infill": bar.add_task("infilling", total=len(tasks)),
                "test": bar.add_task("running tests", total=len(tasks))}
        records = evaluate(model, tasks, options, timeout_s,
                           latency_sample=getattr(args, "latency_sample", LATENCY_SAMPLE),
                           progress=lambda kind: bar.advance(bars[kind]), engine=engine)
    payload = {
        "benchmark": "humaneval-infilling", "split": args.split, "data": str(data_file),
        "selection": "all records" if len(tasks) == in_split else
                     f"{len(tasks)} evenly spaced records of {in_split}",
        "model": str(model.path), "model_sha256": weights_sha256(model.path),
        "training": training_of(model.path), "family": model.family.name,
        "parameters": sum(p.numel() for p in model.network.parameters()),
        "device": model.device.type, "dtype": str(model.dtype).removeprefix("torch."),
        "machine": machine(), "options": asdict(options),
        "context": {"prefix_tokens": PREFIX_TOKENS, "suffix_tokens": SUFFIX_TOKENS,
                    "cut": "by lines, keeping the def signature and docstring ends"},
        "completion_newline": "added when missing (every middle is whole lines)",
        "timeout_s": timeout_s,
        "summary": summarise(records, in_split), "records": records,
    }
    output = Path(args.output) if args.output else RESULTS / f"eval-humaneval-{args.split}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2) + "\n")
    picture = plot(payload, output.with_suffix(".png"))
    summary = payload["summary"]
    print(f"humaneval-infilling {args.split}: {summary['tasks']} tasks "
          f"({payload['selection']}), pass@1 {summary['pass_at_1'] * 100:.1f}% "
          f"({summary['passed']}), exact match {summary['exact_match'] * 100:.1f}%, "
          f"{summary['empty_completions']} empty completions, "
          f"steps p50 {summary['steps_p50']:g}, latency p50 {summary['latency_p50_ms']:.0f} ms "
          f"(alone), {summary['holes_per_s']:.2f} holes/s batched")
    print(f"saved {output}" + (f" and {picture}" if picture else ""))
    return 0
