"""`python -m benchmarks.block_batch`: block-diffusion holes batched, one by one or packed.

An engine batch of block-diffusion holes (Stable-DiffCoder: blocks of 4) runs one denoising
forward per hole (`block_pass`), or one packed forward for all of them
(model/decoding/packed_blocks.py, DIFFUSION_LSP_PACKED_STEPS). Both are timed side by side on a
random Stable-DiffCoder-layout model (`--shape`; small-seed-coder: Qwen2.5-0.5B's sizes),
`--holes` holes joining one batch, each 16 tokens at one token a step (its end banned), in
rounds whose order alternates; whether their texts agree is recorded (on the tiny fixture they
must: tests/test_packed_blocks.py; a random network of 24 layers amplifies rounding, so there
transformers' own whole and incremental passes differ too). Also one hole alone through transformers
and through the fast step's layer loop (`fast_step.block_rows`, on CUDA by default; forced
here). Writes benchmarks/results/block-batch-SHAPE.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

from benchmarks.gpu_check import environment
from benchmarks.report import machine, save
from diffusion_contract.options import InfillOptions
from model.decoding import fast_step, packed_step
from model.decoding.fast_step import switchboard
from model.decoding.hole import final_text
from model.decoding.sampler import denoise_step, new_state
from model.network.shapes import random_model_of_shape

TOKENS = 16
PROMPTS = [  # different lengths: different block offsets and contexts
    "def add(a, b):\n    return ",
    "import os\n\n\ndef home():\n    path = ",
    "class Stack:\n    def __init__(self):\n        self.items = ",
    "def mean(values):\n    total = sum(values)\n    return ",
    "for i in range(10):\n    ",
    "def greet(name):\n    print(",
    "x = [1, 2, 3]\nfor value in x:\n    ",
    "def is_even(n):\n    return ",
]


@contextlib.contextmanager
def layer_loop(on: bool) -> Iterator[None]:
    """The fast step's `enabled` forced on (the layer loop on a CPU), or left as it is."""
    saved = switchboard.enabled, fast_step.enabled
    if on:
        switchboard.enabled = fast_step.enabled = lambda model: True
    try:
        yield
    finally:
        switchboard.enabled, fast_step.enabled = saved


def batch(model, count: int) -> tuple[float, int, list[str]]:
    """`count` holes denoised in one batch to the end: (seconds, batch steps, texts)."""
    options = InfillOptions(max_tokens=TOKENS, min_tokens=TOKENS, threshold=0.95)
    suffix = "\n\nprint('done')\n"
    states = [new_state(model, PROMPTS[i % len(PROMPTS)] * (1 + i // len(PROMPTS)), suffix,
                        options) for i in range(count)]
    began, steps = time.perf_counter(), 0
    while live := [state for state in states if not state.finished]:
        denoise_step(model, live)
        steps += 1
    return time.perf_counter() - began, steps, [final_text(model, s) for s in states]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small-seed-coder")
    parser.add_argument("--holes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model = random_model_of_shape(args.shape, "cpu")
    runs = {  # name -> (packed steps switch, layer loop, holes)
        "batch_one_by_one": ("0", False, args.holes),
        "batch_packed": ("1", False, args.holes),
        "alone_transformers": ("0", False, 1),
        "alone_layer_loop": ("0", True, 1),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    steps: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    batch(model, 1)  # warm-up
    for round_ in range(args.rounds):
        for name in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
            packed, loop, holes = runs[name]
            with environment({packed_step.PACKED_ENV: packed}), layer_loop(loop):
                seconds, steps[name], texts[name] = batch(model, holes)
            times[name].append(seconds)
            print(f"round {round_} {name}: {seconds * 1e3:.0f} ms, {steps[name]} steps",
                  flush=True)
    same = {"batch": texts["batch_one_by_one"] == texts["batch_packed"],
            "alone": texts["alone_transformers"] == texts["alone_layer_loop"]}
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    result = {
        "benchmark": "block_batch", "machine": machine(), "shape": args.shape,
        "dtype": str(model.dtype), "holes": args.holes, "tokens_per_hole": TOKENS,
        "rounds": args.rounds, "steps": steps, "same_texts": same,
        "ms_median": medians, "ms_all": {k: [v * 1e3 for v in vs] for k, vs in times.items()},
        "packed_over_one_by_one": medians["batch_packed"] / medians["batch_one_by_one"],
        "layer_loop_over_transformers": (medians["alone_layer_loop"]
                                         / medians["alone_transformers"]),
    }
    path = save(f"block-batch-{args.shape}", result)
    print(f"packed / one by one: {result['packed_over_one_by_one']:.2f}; layer loop / "
          f"transformers (one hole): {result['layer_loop_over_transformers']:.2f}; "
          f"same texts: {same}; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
