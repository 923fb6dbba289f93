"""Load test of `diffusion-lsp service`: N simulated editors against the service on loopback.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
