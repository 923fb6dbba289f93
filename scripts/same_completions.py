"""The completions of one checkout, as JSON: run it before and after a change of the sampler and
compare the two files (`--compare BEFORE AFTER`) -- issue 31's "the same completions before and
after".

The holes are HumanEval-infilling's (tests/data): each task's middle as one hole (`infill`),
and the middle plus the prompt's last line as two holes filled jointly (`infill_holes`), under
a few sampler settings, on the bundled model and on tiny checkpoints in each family's published
format (model/network/published.py). Only `model.decoding.sampler.infill` and
`model.decoding.multi_hole.infill_holes` are called, so any checkout that has both can run it.

    python scripts/same_completions.py OUT.json
    python scripts/same_completions.py --compare BEFORE.json AFTER.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

# the checkout to run (REPO=/path/to/other/checkout runs that one with this script)
REPO = Path(os.environ.get("REPO", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(REPO))

DATA = REPO / "tests" / "data" / "humaneval-infilling"
SPLITS = ("HumanEval-SingleLineInfilling.jsonl", "HumanEval-MultiLineInfilling.jsonl")
# tiny checkpoints (family, tokens boosted so that the random network writes them often)
TINY = (("dream", ("<|endoftext|>",)), ("diffucoder", ("<|dlm_pad|>",)),
        ("dreamon", ("<|expand|>", "<|delete|>")), ("llada", ("<|endoftext|>",)))
PREFIX_CHARS, SUFFIX_CHARS = 600, 300  # the tiny checkpoints are slow on long sequences


def holes() -> list[tuple[str, str, str]]:
    """(task, prefix, suffix) of every HumanEval-infilling task here."""
    found = []
    for split in SPLITS:
        for line in (DATA / split).read_text().splitlines():
            task = json.loads(line)
            found.append((task["task_id"], task["prompt"][-PREFIX_CHARS:],
                          task["suffix"][:SUFFIX_CHARS]))
    return found


def settings():
    from diffusion_contract.options import InfillOptions, hole_options

    one = {
        "default": InfillOptions(max_tokens=24),
        "editor": hole_options(24),
        "per-step": InfillOptions(max_tokens=16, initial_tokens=16, tokens_per_step=2),
        "low_confidence": InfillOptions(max_tokens=16, steps=8, algorithm="low_confidence"),
        "sampled": InfillOptions(max_tokens=16, temperature=0.8, seed=3),
        "single-line": InfillOptions(max_tokens=24, single_line=True, min_tokens=1),
    }
    several = {
        "default": (InfillOptions(max_tokens=8, threshold=0.5), False),
        "editor": (hole_options(8), True),
        "per-step": (InfillOptions(max_tokens=6, tokens_per_step=3), False),
        "sampled": (InfillOptions(max_tokens=6, temperature=0.8, seed=5), True),
        "min-tokens": (InfillOptions(max_tokens=6, min_tokens=2, initial_tokens=2), False),
    }
    return one, several


def pieces(prefix: str, suffix: str) -> list[str]:
    """Two holes: the prompt's last non-blank line, and the task's middle."""
    lines = prefix.splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.strip())
    line = lines[last]
    indent = len(line) - len(line.lstrip())
    return ["".join(lines[:last]) + line[:indent], "\n" + "".join(lines[last + 1:]), suffix]


def run(model, name: str, out: dict) -> None:
    from model.decoding.multi_hole import infill_holes
    from model.decoding.sampler import infill

    one, several = settings()
    for task, prefix, suffix in holes():
        for label, options in one.items():
            result = infill(model, prefix, suffix, options)
            out[f"{name}|one|{label}|{task}"] = [result.text, result.steps, result.tokens,
                                                 result.finish_reason]
        for label, (options, code_start) in several.items():
            result = infill_holes(model, pieces(prefix, suffix), options, code_start=code_start)
            out[f"{name}|several|{label}|{task}"] = [result.texts, result.steps, result.tokens,
                                                     result.finish_reason]


def collect(path: Path) -> None:
    import torch

    from model.network.loader import load_model
    from model.network.published import write_checkpoint

    torch.set_num_threads(1)
    out: dict = {}
    run(load_model("bundled", device="cpu"), "bundled", out)
    with tempfile.TemporaryDirectory() as root:
        for family, boost in TINY:
            checkpoint = write_checkpoint(Path(root) / family, family, boost=boost, factor=8.0)
            run(load_model(checkpoint, device="cpu"), family, out)
    path.write_text(json.dumps(out, indent=1, sort_keys=True))
    print(f"{len(out)} completions -> {path}")


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    keys = sorted(set(old) | set(new))
    differ = [k for k in keys if old.get(k) != new.get(k)]
    print(f"{len(keys) - len(differ)} of {len(keys)} identical")
    for key in differ:
        print(f"  {key}\n    before {old.get(key)}\n    after  {new.get(key)}")
    return 1 if differ else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    collect(Path(sys.argv[1]))
