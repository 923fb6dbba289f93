"""Several block-diffusion holes' denoising forwards packed into one pass
(model/decoding/packed_blocks.py) compute what each hole's `block_pass` computes alone: the same
rows, and greedy completions identical alone and in any batch (holes joining at different
steps, of different prompt lengths and settings, one cut by its end token)."""

from __future__ import annotations

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding import packed_blocks, packed_step
from model.decoding.block import block_pass
from model.decoding.hole import result as state_result
from model.decoding.sampler import denoise_step, infill, new_state
from model.network.loader import load_model

from .fixtures_block import write_stable_diffcoder
from .fixtures_fast_dllm import write_fast_dllm_v2
from .helpers import one_thread  # noqa: F401 - autouse: tiny matmuls on one thread

HOLES = [  # (prefix, suffix, options): prompt lengths (so block offsets) and settings differ
    ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n",
     InfillOptions(max_tokens=12, threshold=0.95)),
    ("import os\n", "\nprint(1)\n", InfillOptions(max_tokens=8)),
    ("class A:\n    def __init__(self):\n        self.", "\n",
     InfillOptions(max_tokens=16, tokens_per_step=2)),
    ("x = [", "]\n", InfillOptions(max_tokens=8, single_line=True)),
    ("for i in range(10):\n    " * 6, "", InfillOptions(max_tokens=12, threshold=0.5)),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Plain random (no hole ends before max_tokens), and one whose end token wins often."""
    root = tmp_path_factory.mktemp("packed-blocks")
    return {name: load_model(write_stable_diffcoder(root / name, eos_boost=boost), device="cpu",
                             dtype="float32") for name, boost in (("plain", 1.0), ("ends", 3.0))}


@pytest.fixture()
def spy(monkeypatch) -> list[int]:
    """The batch sizes the packed block pass ran with."""
    sizes: list[int] = []
    original = packed_blocks.packed_block_pass

    def counted(model, states):
        sizes.append(len(states))
        return original(model, states)

    monkeypatch.setattr("model.decoding.passes.packed_block_pass", counted)
    return sizes


def outcome(result) -> tuple:
    return result.text, result.steps, result.finish_reason, [s.committed for s in result.trace]


def staggered(model, holes, joins: list[int]) -> list[tuple]:
    """The holes denoised in one shared batch, hole i made and joining at step joins[i]; a
    finished hole is left out of the next steps."""
    states: dict[int, object] = {}
    for step in range(max(joins) + 10_000):
        states.update({i: new_state(model, *holes[i]) for i, join in enumerate(joins)
                       if join == step})
        if len(states) == len(holes) and all(s.finished for s in states.values()):
            break
        if live := [s for s in states.values() if not s.finished]:
            denoise_step(model, live)
    return [outcome(state_result(model, states[i], {})) for i in range(len(holes))]


def test_packed_rows_are_each_holes_own_block_pass(models):
    model = models["plain"]
    states = [new_state(model, prefix, suffix, options) for prefix, suffix, options in HOLES]
    for index, state in enumerate(states):  # holes at different blocks and steps
        for _ in range(index):
            if not state.finished:
                denoise_step(model, [state])
    live = [state for state in states if not state.finished]
    assert len(live) >= 3
    packed = packed_blocks.packed_block_pass(model, live)
    for state, got in zip(live, packed, strict=True):
        torch.testing.assert_close(got, block_pass(model, state), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["plain", "ends"])
def test_greedy_completions_are_the_same_alone_and_in_any_batch(models, name, spy):
    model = models[name]
    assert packed_step.enabled(model)
    expected = [outcome(infill(model, prefix, suffix, options))
                for prefix, suffix, options in HOLES]
    assert staggered(model, HOLES, [0, 0, 0, 0, 0]) == expected
    assert staggered(model, HOLES, [0, 1, 3, 2, 5]) == expected
    assert staggered(model, HOLES[::-1], [4, 0, 2, 2, 1]) == expected[::-1]
    assert max(spy) >= 3  # the block passes really were packed
    if name == "ends":  # some holes end at their end token while others go on
        assert {reason for _, _, reason, _ in expected} == {"end", "max_tokens"}


def test_unpacked_they_run_one_by_one(models, monkeypatch, spy):
    model = models["plain"]
    monkeypatch.setenv(packed_step.PACKED_ENV, "0")
    expected = [outcome(infill(model, prefix, suffix, options))
                for prefix, suffix, options in HOLES[:3]]
    assert staggered(model, HOLES[:3], [0, 1, 0]) == expected
    assert not spy


def test_fast_dllm_v2s_shifted_sub_block_steps_pack_too(tmp_path, spy):
    """Fast-dLLM v2 (shifted logits, sub-blocks): its denoising forwards pack, reading the rows
    `block_pass` reads; the step that writes the rows before a block (its first token) runs
    alone. Greedy completions the same alone and batched."""
    model = load_model(write_fast_dllm_v2(tmp_path / "m"), device="cpu", dtype="float32")
    holes = [(prefix, "", options) for prefix, _, options in HOLES]
    expected = [outcome(infill(model, prefix, suffix, options))
                for prefix, suffix, options in holes]
    assert staggered(model, holes, [0, 1, 3, 2, 5]) == expected
    assert max(spy) >= 3
    state = new_state(model, "x" * 40, "", InfillOptions(max_tokens=40))
    while not packed_blocks.writes_first(state):
        assert packed_blocks.packable(state)
        denoise_step(model, [state])
    assert not packed_blocks.packable(state)  # the write step: alone
