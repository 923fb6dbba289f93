"""Batched hole steps packed into one pass (model/decoding/packed_step.py) compute what each hole
alone computes, on every published family's tiny checkpoint and the bundled model: the hidden states
agree, and greedy completions are identical alone and in any batch -- holes at different
steps, of different lengths and settings, sharing a step; a cancelled one leaves at the next."""

from __future__ import annotations

import threading

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding import packed_step, passes
from model.decoding.hole import result as state_result
from model.decoding.passes import forward_holes
from model.decoding.sampler import denoise_step, infill, new_state
from model.engine import Engine
from model.network.loader import bundled_model_path, load_model
from model.network.published import FAMILY_SPECS, write_checkpoint

from .helpers import one_thread  # noqa: F401 - the module's autouse fixture

HOLES = [  # (prefix, suffix, options): lengths, positions and settings all differ
    ("def add(a, b):\n    total = a + b\n    return ", "\n\nprint(add(1, 2))\n",
     InfillOptions(max_tokens=16, initial_tokens=16, tokens_per_step=2)),
    ("import os\n", "\nprint(1)\n", InfillOptions(max_tokens=12, threshold=0.05)),
    ("class A:\n    def __init__(self):\n        self.", "\n",
     InfillOptions(max_tokens=24, initial_tokens=8, tokens_per_step=3, refresh_every=3)),
    ("x = [", "]\n", InfillOptions(max_tokens=8, single_line=True, tokens_per_step=1)),
    ("for i in range(10):\n    " * 6, "", InfillOptions(max_tokens=20, tokens_per_step=4)),
]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("packed-families")
    return {name: load_model(write_checkpoint(root / name, name), device="cpu",
                             dtype="float32") for name in FAMILY_SPECS}


@pytest.fixture()
def spy(monkeypatch) -> list[int]:
    """The batch sizes the packed step ran with."""
    sizes: list[int] = []
    original = packed_step.packed_hole_step

    def counted(model, windows, fused=False):
        sizes.append(len(windows))
        return original(model, windows, fused)

    monkeypatch.setattr(packed_step, "packed_hole_step", counted)
    return sizes


def alone(model, holes) -> list[tuple]:
    return [outcome(infill(model, prefix, suffix, options)) for prefix, suffix, options in holes]


def outcome(result) -> tuple:
    return result.text, result.steps, result.full_passes, result.finish_reason


def staggered(model, holes, joins: list[int]) -> list[tuple]:
    """The holes denoised in one shared loop, hole i joining at step joins[i] (so holes at
    different steps share a step) and leaving as soon as it is finished."""
    states = [new_state(model, prefix, suffix, options) for prefix, suffix, options in holes]
    active, done, step = [], {}, 0
    while len(done) < len(states):
        active += [i for i, join in enumerate(joins) if join == step]
        if active:
            denoise_step(model, [states[i] for i in active])
        for i in [i for i in active if states[i].finished]:
            done[i] = outcome(state_result(model, states[i], {}))
            active.remove(i)
        step += 1
    return [done[i] for i in range(len(states))]


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_packed_rows_are_each_holes_own_pass(family_models, name, monkeypatch):
    model = family_models[name]
    states = [new_state(model, prefix, suffix, options) for prefix, suffix, options in HOLES]
    for state in states:
        forward_holes(model, [state])  # a full pass each: its context cache
    monkeypatch.setenv(packed_step.PACKED_ENV, "0")
    reference = [passes._hole_pass(model, [state])[0] for state in states]
    monkeypatch.setenv(packed_step.PACKED_ENV, "1")
    packed = passes._hole_pass(model, states)
    for got, want in zip(packed, reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert all(state.context.age == 2 for state in states)


@pytest.mark.slow
def test_flex_attentions_document_mask_gives_the_same_rows(family_models, monkeypatch):
    """The other packed attention (FlexAttention with a document mask, compiled; the GPU
    check measures both) computes the per-hole calls' rows."""
    model = family_models["llada"]
    states = [new_state(model, prefix, suffix, options) for prefix, suffix, options in HOLES]
    for state in states:
        forward_holes(model, [state])
    per_hole = passes._hole_pass(model, states)
    monkeypatch.setenv(packed_step.ATTENTION_ENV, packed_step.FLEX)
    flex = passes._hole_pass(model, states)
    for got, want in zip(flex, per_hole, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_greedy_completions_are_the_same_alone_and_in_any_batch(family_models, name, spy):
    model = family_models[name]
    assert packed_step.enabled(model)  # on a CPU too: measured faster than transformers'
    expected = alone(model, HOLES)
    assert staggered(model, HOLES, [0, 0, 0, 0, 0]) == expected
    assert staggered(model, HOLES, [0, 1, 3, 2, 5]) == expected
    assert staggered(model, HOLES[::-1], [4, 0, 2, 2, 1]) == expected[::-1]
    assert max(spy) >= 2  # the hole-only steps really were packed


def test_the_transformers_batch_gives_them_too(family_models, monkeypatch):
    """With the packed step off, the batch goes through transformers' padded pass as before."""
    model = family_models["dream"]
    monkeypatch.setenv(packed_step.PACKED_ENV, "0")
    assert not packed_step.enabled(model)
    assert staggered(model, HOLES, [0, 1, 3, 2, 5]) == alone(model, HOLES)


def test_the_engine_packs_its_batch_and_a_cancelled_hole_leaves_at_the_next_step(
        tiny_model, spy):
    model = tiny_model  # the default family (the bundled model's kind)
    slow = InfillOptions(max_tokens=24, initial_tokens=24, tokens_per_step=1, min_tokens=24,
                         threshold=1.0)
    engine = Engine(model)
    try:
        seen, stepped = [], threading.Event()

        def on_step(state) -> None:
            seen.append(state.steps)
            stepped.set()

        cancelled = engine.submit("def f(x):\n    return ", "\n", slow, on_step=on_step)
        others = [engine.submit(prefix, suffix, options) for prefix, suffix, options in HOLES]
        assert stepped.wait(60)
        cancelled.cancel()
        results = [request.result(60) for request in others]
        with pytest.raises(Exception, match="cancelled"):
            cancelled.result(60)
    finally:
        engine.close()
    assert [outcome(r) for r in results] == alone(model, HOLES)
    assert max(spy) >= 3
    assert len(seen) <= 3  # it left within a step of its cancel (one may be in flight)


@pytest.mark.slow
@pytest.mark.skipif(bundled_model_path() is None, reason="no bundled model")
def test_the_bundled_model_completes_the_same_alone_and_in_a_batch(spy):
    model = load_model(None, device="cpu")
    holes = [(prefix, suffix, InfillOptions(max_tokens=options.max_tokens,
                                            tokens_per_step=options.tokens_per_step))
             for prefix, suffix, options in HOLES]
    assert staggered(model, holes, [0, 1, 0, 2, 1]) == alone(model, holes)
    assert max(spy) >= 3
