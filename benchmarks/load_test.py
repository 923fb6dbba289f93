"""Load tests: N editors against one replica's engine (`bench load`), and against the service.

`diffusion-lsp bench load` (`run_load_bench`): 1 / 2 / 4 simulated editors against one engine
in this process -- what one replica of the service runs -- on a random-weight model of a
published shape (default: the 0.5B one on a CPU). Each editor types in its own document,
closed loop: one completion in flight, the next asked the moment it is answered, one more
character typed each time, so the document's cached context is reused (model.decoding.prompt_cache)
and every hole has the same number of tokens (ends banned). Batched steps are measured three
ways side by side, in rounds whose order rotates: packed into one pass, first passes too
(model.decoding.packed_step), only the hole-only steps packed (`first-apart`), and through
transformers' padded batch. Per level: p50 / p95 of a completion, the p50 of one
editor alone, and the aggregate tokens/s (all editors' tokens over the wall time), against one
by one (one editor). The GPU check's `concurrent4/16/64` run the same loop (`editors_load`).

For each replica count, the service is started by its own command (Ray Serve, a fresh local Ray
instance) on a free loopback port with a bearer token. Then, for each N, N editors run for a
fixed time, closed loop: each keeps exactly one completion in flight (send, wait for the
answer, send the next), the worst case of N people typing at once without pause. Holes are
HumanEval-infilling holes (as `bench` uses), alternating single-line and multi-line.

Per (replicas, N): p50/p95/p99 latency at the client, completions/s, completion tokens/s,
errors, and the replica-side p50 (from /metrics) to separate the model from the HTTP path.
Writes benchmarks/results/load_test.json and .png, prints a table, and names the machine.
Everything is bounded: per-level time, per-request timeout, loopback only.

    python benchmarks/load_test.py [--model PATH] [--replicas 1 2] [--editors 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import RESULTS, load_holes, machine  # noqa: E402
from diffusion_contract.percentile import percentile  # noqa: E402
from model.network.loader import bundled_model_path  # noqa: E402

TOKEN = "load-test-token"  # a throwaway token for this run's own loopback service
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 30.0
MAX_TOKENS = {"single-line": 24, "multi-line": 64}
FALLBACK_HOLES = [  # when the HumanEval-infilling data is not beside the repo
    {"prompt": "def add(a, b):\n    return ", "suffix": "\n", "split": "single-line"},
    {"prompt": "for i in range(10):\n    ", "suffix": "\nprint('done')\n",
     "split": "multi-line"},
]


TYPED = "result = value + 1  # typed"  # one more character of it in each request
ENGINE_EDITORS = (1, 2, 4)
ENGINE_TIMEOUT_S = 600.0
# DIFFUSION_LSP_PACKED_STEPS, DIFFUSION_LSP_PACKED_FIRST_PASSES: everything packed, only the
# hole-only steps packed (first passes through transformers' padded batch), nothing packed
BATCHING_MODES = {"packed": ("1", "1"), "first-apart": ("1", "0"), "transformers": ("0", "0")}


def editors_load(engine: Any, pool: list[dict], editors: int, requests: int, options: Any,
                 tag: str = "") -> dict:
    """`editors` editors typing in their own documents against `engine`, closed loop, each
    asking `requests` timed completions (after one untimed one that caches its document).
    Returns the completions' milliseconds and tokens, and the wall time of the timed part."""
    samples: list[tuple[float, int]] = []
    start = threading.Barrier(editors + 1)
    failures: list[BaseException] = []

    def editor(index: int) -> None:
        hole = pool[index % len(pool)]
        document = f"{tag}editor-{index}"
        try:
            engine.submit(hole["prompt"], hole["suffix"], options,
                          document=document).result(ENGINE_TIMEOUT_S)
        except BaseException as error:  # noqa: BLE001 - said by the caller
            failures.append(error)
        start.wait()
        for typed in range(1, requests + 1):
            began = time.perf_counter()
            try:
                result = engine.submit(hole["prompt"] + TYPED[:typed % len(TYPED)],
                                       hole["suffix"], options,
                                       document=document).result(ENGINE_TIMEOUT_S)
            except BaseException as error:  # noqa: BLE001 - said by the caller
                failures.append(error)
                return
            samples.append(((time.perf_counter() - began) * 1e3, result.tokens))

    threads = [threading.Thread(target=editor, args=(index,), daemon=True)
               for index in range(editors)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"{len(failures)} completion(s) failed: {failures[0]!r}")
    return {"ms": [ms for ms, _ in samples], "tokens": sum(t for _, t in samples),
            "wall_s": wall}


def load_figures(runs: list[dict], single: list[float]) -> dict:
    """p50 / p95 / aggregate tokens/s of one level's runs (each `editors_load`'s), beside
    the p50 of one editor alone (`single`: its completions' ms)."""
    ms = [value for run in runs for value in run["ms"]]
    return {"p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
            "single_p50_ms": round(percentile(single, 50), 1), "completions": len(ms),
            "tokens_per_s": round(sum(r["tokens"] for r in runs)
                                  / sum(r["wall_s"] for r in runs), 1)}


def run_load_bench(args: argparse.Namespace) -> int:
    """`diffusion-lsp bench load`: see the module's docstring."""
    import torch

    from benchmarks.report import publish
    from diffusion_contract.options import InfillOptions
    from model.decoding.packed_step import FIRST_PASSES_ENV, PACKED_ENV
    from model.decoding.prompt_cache import PromptCache
    from model.engine import Engine
    from model.network.load import load_for_cli
    from model.network.shapes import random_model_of_shape

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape or (None if args.model else "qwen2.5-0.5b")

    def load():
        if args.threads:
            torch.set_num_threads(args.threads)
        return (random_model_of_shape(shape, args.device, quantization=args.quantization)
                if shape else load_for_cli(args))

    engine = Engine.start(load, max_batch=max(ENGINE_EDITORS), warm_up=True,
                          prompt_cache=PromptCache(max_documents=256)).result()
    model = engine.model
    tokens_per_step = args.tokens_per_step or 4
    options = InfillOptions(max_tokens=args.max_tokens, initial_tokens=args.max_tokens,
                            min_tokens=args.max_tokens, tokens_per_step=tokens_per_step)
    try:
        pool = load_holes("multi-line", max(ENGINE_EDITORS),
                          Path(args.data) if args.data else None)
    except OSError:
        pool = FALLBACK_HOLES
    requests = args.limit
    levels = [(1, "packed")] + [(n, mode) for n in ENGINE_EDITORS[1:] for mode in BATCHING_MODES]
    runs: dict[tuple[int, str], list[dict]] = {level: [] for level in levels}
    saved = {name: os.environ.get(name) for name in (PACKED_ENV, FIRST_PASSES_ENV)}
    try:
        for round_ in range(args.rounds):
            turn = round_ % len(levels)
            for editors, mode in levels[turn:] + levels[:turn]:
                os.environ[PACKED_ENV], os.environ[FIRST_PASSES_ENV] = BATCHING_MODES[mode]
                runs[(editors, mode)].append(editors_load(
                    engine, pool, editors, requests, options, f"{mode}-{round_}-"))
                print(f"round {round_ + 1}: {editors} editor(s), {mode}: "
                      f"{statistics.median(runs[(editors, mode)][-1]['ms']):.0f} ms p50",
                      flush=True)
    finally:
        engine.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    single = [ms for run in runs[(1, "packed")] for ms in run["ms"]]
    rows = []
    for editors, mode in levels:
        figures = load_figures(runs[(editors, mode)], single)
        rows.append({"editors": editors, "batching": mode if editors > 1 else "alone",
                     **figures})
    alone = rows[0]["tokens_per_s"]
    for row in rows:
        row["aggregate_over_one_by_one"] = round(row["tokens_per_s"] / alone, 2)
    payload = {"benchmark": "load", "model": shape or str(model.path),
               "parameters": sum(p.numel() for p in model.network.parameters()),
               "device": model.device.type, "dtype": str(model.dtype),
               "machine": machine() | {"cores": os.cpu_count(),
                                       "load_average": os.getloadavg()},
               "hole_tokens": args.max_tokens, "tokens_per_step": tokens_per_step,
               "requests_per_editor_per_round": requests, "rounds": args.rounds,
               "document_cache": True, "rows": rows}
    print(f"{'editors':>7} {'batching':>12} {'p50 ms':>8} {'p95 ms':>8} {'single p50':>10} "
          f"{'tokens/s':>9} {'vs alone':>8}")
    for row in rows:
        print(f"{row['editors']:>7} {row['batching']:>12} {row['p50_ms']:>8.0f} "
              f"{row['p95_ms']:>8.0f} {row['single_p50_ms']:>10.0f} {row['tokens_per_s']:>9.1f} "
              f"{row['aggregate_over_one_by_one']:>7.2f}x")
    publish(f"load-{shape}" if shape else "load", payload, lambda: None)
    return 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def holes(limit: int) -> list[dict]:
    try:
        found = []
        for split in ("single-line", "multi-line"):
            found += [{"prompt": r["prompt"], "suffix": r["suffix"], "split": split}
                      for r in load_holes(split, limit)]
        return found
    except OSError:
        return FALLBACK_HOLES


class Service:
    """`diffusion-lsp service` as a child process."""

    def __init__(self, replicas: int, model: str | None, batching: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "diffusion_lsp", "service", "--port", str(self.port),
                   "--replicas", str(replicas), "--num-cpus", str(os.cpu_count() or 2),
                   "--device", "cpu", "--batching", batching, "--log-level", "WARNING"]
        if model:
            command += ["--model", model]
        env = os.environ | {"DIFFUSION_LSP_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}
        self.log = log
        with log.open("w") as handle:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle,
                                            stderr=subprocess.STDOUT)

    def wait_ready(self) -> float:
        began = time.monotonic()
        while time.monotonic() - began < START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.monotonic() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the service did not start in time")

    def stop(self) -> float:
        began = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return time.monotonic() - began


async def editor(client: httpx.AsyncClient, url: str, pool: list[dict], offset: int,
                 until: float, samples: list[dict]) -> None:
    """One simulated editor: one completion in flight at a time until `until`."""
    index = offset
    while time.monotonic() < until:
        hole = pool[index % len(pool)]
        index += 7  # editors walk the holes in different orders
        body = {"model": "diffusion-lsp", "prompt": hole["prompt"], "suffix": hole["suffix"],
                "max_tokens": MAX_TOKENS[hole["split"]]}
        if hole["split"] == "single-line":
            body["stop"] = ["\n"]
        began = time.perf_counter()
        try:
            answer = await client.post(url + "/v1/fim/completions", json=body)
            status = answer.status_code
            tokens = answer.json()["usage"]["completion_tokens"] if status == 200 else 0
        except httpx.HTTPError as error:
            status, tokens = type(error).__name__, 0
        samples.append({"ms": (time.perf_counter() - began) * 1e3, "status": status,
                        "tokens": tokens, "end": time.monotonic()})


async def level(url: str, editors: int, seconds: float, pool: list[dict]) -> dict:
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=editors, max_keepalive_connections=editors)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, limits=limits,
                                 timeout=REQUEST_TIMEOUT_S) as client:
        await client.get(url + "/metrics")  # warm the connection and the gateway
        began = time.monotonic()
        until = began + seconds
        await asyncio.gather(*(editor(client, url, pool, n * 13, until, samples)
                               for n in range(editors)))
        elapsed = time.monotonic() - began
        metrics = (await client.get(url + "/metrics?format=json")).json()
    ok = [s for s in samples if s["status"] == 200]
    ms = [s["ms"] for s in ok]
    errors: dict[str, int] = {}
    for sample in samples:
        if sample["status"] != 200:
            errors[str(sample["status"])] = errors.get(str(sample["status"]), 0) + 1
    return {
        "editors": editors, "seconds": round(elapsed, 2), "completions": len(ok),
        "errors": errors,
        "p50_ms": round(percentile(ms, 50), 1) if ms else None,
        "p95_ms": round(percentile(ms, 95), 1) if ms else None,
        "p99_ms": round(percentile(ms, 99), 1) if ms else None,
        "completions_per_s": round(len(ok) / elapsed, 2),
        "tokens_per_s": round(sum(s["tokens"] for s in ok) / elapsed, 1),
        "replica_p50_ms_cumulative": metrics["model_ms"]["p50"],
        "by_replica_cumulative": metrics["by_replica"],
    }


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in results["runs"]:
        label = f"{run['replicas']} replica{'s' if run['replicas'] > 1 else ''}"
        if run["batching"] != "engine":
            label += f" ({run['batching']} batching)"
        levels = [lv for lv in run["levels"] if lv["p50_ms"] is not None]
        n = [lv["editors"] for lv in levels]
        line = latency.plot(n, [lv["p50_ms"] for lv in levels], "o-", label=f"{label} p50")[0]
        latency.plot(n, [lv["p95_ms"] for lv in levels], "s--", color=line.get_color(),
                     label=f"{label} p95")
        throughput.plot(n, [lv["completions_per_s"] for lv in levels], "o-", label=label)
    for axis in (latency, throughput):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent editors (one completion in flight each)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    latency.set_ylabel("latency at the client (ms)")
    latency.set_yscale("log")
    throughput.set_ylabel("completions / s")
    throughput.set_ylim(bottom=0)
    figure.suptitle(f"diffusion-lsp service on Ray Serve, {results['model']} — "
                    f"{results['machine']['cpu']} ({results['machine']['cores']} cores, CPU only)",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="model directory (default: the bundled model)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--editors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=12.0, help="per level")
    parser.add_argument("--batching", nargs="+", default=["engine"],
                        choices=["engine", "serve"])
    parser.add_argument("--holes", type=int, default=40, help="holes per split")
    parser.add_argument("--output", default=str(RESULTS / "load_test.json"))
    parser.add_argument("--note", default="", help="what else the machine was doing")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG from the JSON at --output")
    args = parser.parse_args(argv)
    if args.replot:
        output = Path(args.output)
        plot(json.loads(output.read_text()), output.with_suffix(".png"))
        return 0
    if max(args.editors) > 64 or args.seconds > 120:
        parser.error("bounded: at most 64 editors and 120 s per level")
    model = args.model or (str(bundled_model_path()) if bundled_model_path() else None)
    if model is None:
        parser.error("no bundled model: pass --model PATH")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    pool = holes(args.holes)
    info = machine() | {"cores": os.cpu_count(), "gpu": "none",
                        "load_average_at_start": os.getloadavg()}
    shown = Path(model).resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown
    results = {"benchmark": "load_test", "model": Path(model).name, "model_path": str(shown),
               "note": args.note, "machine": info,
               "closed_loop": True, "request_timeout_s": REQUEST_TIMEOUT_S,
               "max_tokens": MAX_TOKENS, "holes": len(pool), "runs": []}
    for batching in args.batching:
        for replicas in args.replicas:
            log = Path(tempfile.gettempdir()) / f"load-test-service-{replicas}-{batching}.log"
            service = Service(replicas, model, batching, log)
            try:
                startup = service.wait_ready()
                run = {"replicas": replicas, "batching": batching,
                       "startup_s": round(startup, 1), "levels": []}
                for editors in args.editors:
                    run["levels"].append(asyncio.run(level(service.url, editors, args.seconds,
                                                           pool)))
                    _print_row(run, run["levels"][-1])
            finally:
                stop = service.stop()
            run["stop_s"] = round(stop, 1)
            run["stop_exit_code"] = service.process.returncode
            results["runs"].append(run)
    info["load_average_at_end"] = os.getloadavg()
    output.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output.with_suffix(".png"))
    print(f"\nwrote {output} and {output.with_suffix('.png')}")
    return 0


def _print_row(run: dict, row: dict) -> None:
    if row["editors"] == run["levels"][0]["editors"]:
        print(f"\n{run['replicas']} replica(s), {run['batching']} batching "
              f"(started in {run['startup_s']} s)")
        print(f"{'editors':>8} {'done':>6} {'err':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'compl/s':>8} {'tok/s':>8}")
    print(f"{row['editors']:>8} {row['completions']:>6} {sum(row['errors'].values()):>5} "
          f"{row['p50_ms'] or 0:>8.1f} {row['p95_ms'] or 0:>8.1f} {row['p99_ms'] or 0:>8.1f} "
          f"{row['completions_per_s']:>8.2f} {row['tokens_per_s']:>8.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
