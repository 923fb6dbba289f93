"""The block-diffusion forward on the fast step's layer loop
(model/decoding/fast_step/block_step.py) computes what `model.decoding.block.run_rows` computes
through transformers, on both block families' tiny published checkpoints (CPU, eager: a CUDA
graph replays these kernels, tests/test_cuda.py); with it on, exact mode still reproduces the
published samplers token for token and forward for forward, and completions do not change."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding import fast_step
from model.decoding.block import BlockCache, run_rows
from model.decoding.fast_step import block_step
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import generate_exact, infill
from model.network.loader import load_model

from .fast_dllm_v2_reference import FastDllmV2Reference
from .fixtures_block import generate_block_both, official_model, write_stable_diffcoder
from .fixtures_fast_dllm import write_fast_dllm_v2
from .helpers import (
    one_thread,  # noqa: F401 - autouse: tiny matmuls on one thread
    patch_fast_step,
)

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
# (cache rows, new rows): a prefill over several blocks and a partial one, a block after a
# cache ending inside a block (the prompt's tail shares it), several blocks after a whole one,
# one block past a context bucket (CONTEXT_BUCKET = 256), a prefill filling a bucket exactly
SPLITS = [(0, 23), (6, 2), (8, 12), (300, 4), (0, 256)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("block-step")
    return {"stable-diffcoder": write_stable_diffcoder(root / "sdc", eos_boost=8.0),
            "fast-dllm-v2": write_fast_dllm_v2(root / "fdl", stop_boost=3.0)}


@pytest.fixture(scope="module")
def models(checkpoints) -> dict:
    return {name: load_model(path, device="cpu", dtype="float32")
            for name, path in checkpoints.items()}


def on_fast_step(monkeypatch, graphs: bool = False) -> block_step.BlockSteps:
    """run_rows through the layer loop as on CUDA; with `graphs`, through BlockSteps' static
    shapes too (eager here). Returns the BlockSteps it uses."""
    steps = {}

    def shared(model):
        return steps.setdefault(id(model), block_step.BlockSteps(model, graphs_on=False))

    patch_fast_step(monkeypatch, "enabled", lambda m: True)
    monkeypatch.setattr(block_step, "block_steps", shared)
    monkeypatch.setenv(fast_step.BLOCK_GRAPHS_ENV, "1" if graphs else "0")
    return steps


def cache_of(model, ids: torch.Tensor, rows: int, block_length: int) -> BlockCache:
    """The exact cache of ids[:rows], through transformers."""
    if not rows:
        return BlockCache([])
    _, layers = run_rows(model, BlockCache([]), ids[:rows], block_length)
    return BlockCache(layers, rows)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name", ["stable-diffcoder", "fast-dllm-v2"])
def test_block_rows_are_run_rows_through_transformers(models, monkeypatch, name, graphs):
    """Hidden states and the kept keys/values, for prefills, blocks after a cache ending in
    or at the end of a block, and past a context bucket."""
    model = models[name]
    block_length = model.family.block_length
    ids = torch.randint(10, 300, (310,), generator=torch.Generator().manual_seed(3))
    for rows, count in SPLITS:
        monkeypatch.setenv(fast_step.BLOCK_GRAPHS_ENV, "0")
        cache = cache_of(model, ids, rows, block_length)
        expected, expected_layers = run_rows(model, cache, ids[rows:rows + count], block_length)
        on_fast_step(monkeypatch, graphs)
        hidden, layers = run_rows(model, cache, ids[rows:rows + count], block_length)
        monkeypatch.undo()
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
        assert len(layers) == len(expected_layers)
        for (k, v), (ek, ev) in zip(layers, expected_layers, strict=True):
            assert k.shape == ek.shape == (1, 2, rows + count, ek.shape[-1])
            torch.testing.assert_close(k, ek, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, ev, atol=1e-5, rtol=1e-5)


def test_run_rows_takes_the_layer_loop_where_the_fast_step_runs(models, monkeypatch):
    model = models["stable-diffcoder"]
    called = []
    monkeypatch.setattr(block_step, "window_forward",
                        lambda *a, **k: called.append(1) or torch.zeros(1, 3, 32))
    run_rows(model, BlockCache([]), torch.tensor([11, 12, 13]), 4)
    assert not called  # on a CPU: transformers
    patch_fast_step(monkeypatch, "enabled", lambda m: True)
    run_rows(model, BlockCache([]), torch.tensor([11, 12, 13]), 4)
    assert called


def test_a_shape_loads_only_the_rows_it_lacks(models):
    """A block's denoising forwards and its write start where the cache ends: after the first
    load, the static shape copies in nothing (the write's kept rows are its own); a cache it
    never saw is loaded whole; what comes back is the same either way."""
    model = models["stable-diffcoder"]
    steps = block_step.BlockSteps(model, graphs_on=False)
    ids = torch.randint(10, 300, (40,), generator=torch.Generator().manual_seed(4))
    prompt = cache_of(model, ids, 16, 4)
    steps.run(prompt.layers, 16, ids[16:20], 4)  # a denoising forward: loads the prompt
    assert steps.loaded_rows == 16
    _, kept = steps.run(prompt.layers, 16, ids[16:20], 4)  # the block's write
    assert steps.loaded_rows == 16  # the prompt's rows were still there
    for _ in range(2):  # the next block's denoising forwards, against the written cache
        hidden, _ = steps.run(kept, 20, ids[20:24], 4)
    assert steps.loaded_rows == 16
    expected, _ = run_rows(model, BlockCache(kept, 20), ids[20:24], 4)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    other = cache_of(model, ids.flip(0), 20, 4)  # another hole's cache, same shape
    hidden, _ = steps.run(other.layers, 20, ids[20:24], 4)
    assert steps.loaded_rows == 36
    expected, _ = run_rows(model, other, ids[20:24], 4)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    hidden, _ = steps.run(kept, 20, ids[20:24], 4)  # back to the first: its rows were replaced
    assert steps.loaded_rows == 56


@pytest.mark.parametrize("graphs", [False, True])
def test_exact_mode_is_still_generate_block(checkpoints, models, monkeypatch, graphs):
    """Stable-DiffCoder's published `generate_block`: ids and forwards, with the block step."""
    model, official = models["stable-diffcoder"], official_model(checkpoints["stable-diffcoder"])
    on_fast_step(monkeypatch, graphs)
    for length, threshold in ((1, None), (4, 0.95), (6, None), (9, 0.95)):
        ours, published = generate_block_both(model, official, length, threshold)
        assert ours == published


def test_exact_mode_is_still_fast_dllm_v2s_generate(checkpoints, models, monkeypatch):
    model = models["fast-dllm-v2"]
    path = checkpoints["fast-dllm-v2"]
    reference = FastDllmV2Reference(path, json.loads((path / "config.json").read_text()))
    on_fast_step(monkeypatch, graphs=True)
    for length in (3, 33, 70):
        prompt = torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(1))
        expected, expected_forwards = reference.generate(prompt.clone(), 64, threshold=0.9)
        ours, forwards = generate_exact(model, prompt, gen_length=64, threshold=0.9)
        assert torch.equal(ours, expected) and forwards == expected_forwards


def test_completions_do_not_change(models, monkeypatch):
    """FIM completions with the document's exact cache, typed along: the same texts, steps
    and reuse through the layer loop as through transformers."""
    model = models["stable-diffcoder"]
    body = "".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(60))
    options = InfillOptions(max_tokens=12, threshold=0.95)

    def complete() -> list:
        cache = PromptCache()
        return [infill(model, body + PREFIX + typed, SUFFIX, options, cache=cache,
                       document="a.py") for typed in ("", "a", "a +")]

    plain = complete()
    steps = on_fast_step(monkeypatch, graphs=True)
    fast = complete()
    for a, b in zip(plain, fast, strict=True):
        assert (b.text, b.steps, b.reused_tokens, [s.committed for s in b.trace]) == \
            (a.text, a.steps, a.reused_tokens, [s.committed for s in a.trace])
    assert fast[1].reused_tokens > 0 and steps  # the document's rows were reused; shapes ran
