"""What every benchmark shares: where results go, the holes it runs, the machine it ran on,
percentiles (`diffusion_contract.percentile`), and plots.

Every benchmark prints a table, saves JSON (and a PNG when matplotlib is installed) under
benchmarks/results/ and names the machine, because figures here are only comparable side by
side.
"""

from __future__ import annotations

import gzip
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EVAL_DATA = REPO.parent / "shared" / "eval-data" / "humaneval-infilling"
SPLIT_FILES = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
}
DATA_SOURCE = ("the data/ folder of https://github.com/openai/human-eval-infilling "
               "(MIT; CI keeps a copy in ../shared/eval-data/humaneval-infilling)")


class EvalDataMissing(FileNotFoundError):
    """HumanEval-infilling is not where it was looked for; the message says where to get it."""


def missing_data(looked: str) -> EvalDataMissing:
    return EvalDataMissing(
        f"HumanEval-infilling data not found in {looked}: download the "
        f"HumanEval-*Infilling.jsonl.gz files from {DATA_SOURCE} and pass --data DIR (the "
        "folder that holds them)")


def split_path(split: str, data: Path | None = None) -> Path:
    """The split's .jsonl.gz file; raises EvalDataMissing (saying where to get it)."""
    path = (data or EVAL_DATA) / SPLIT_FILES[split]
    if not path.is_file():
        raise missing_data(str(path.parent))
    return path


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def load_holes(split: str, limit: int, data: Path | None = None) -> list[dict]:
    """Evenly spaced records of a HumanEval-infilling split: {task_id, prompt, suffix}."""
    with gzip.open(split_path(split, data), "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    stride = max(1, len(records) // limit)
    return records[::stride][:limit]


def publish(name: str, payload: dict, draw: Callable[[], Path | None]) -> Path:
    """Save `payload` as NAME.json, draw its picture (`draw` returns the PNG's path, or None
    without matplotlib), and say where both went."""
    path = save(name, payload)
    picture = draw()
    print(f"saved {path}" + (f" and {picture}" if picture else ""))
    return path


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_cdf(ax, rows: list[dict], label: str) -> None:
    """The fraction of rows at or under each latency."""
    values = sorted(r["latency_ms"] for r in rows)
    ax.plot(values, [i / len(values) for i in range(len(values))], label=label)


def save_figure(plt, fig, name: str) -> Path:
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
