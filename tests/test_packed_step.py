"""Batched hole steps packed into one pass (model/decoding/packed_step.py) compute what each hole
alone computes, on every published family's tiny checkpoint and the bundled model: the hidden states
agree, and greedy completions are identical alone and in any batch -- holes at different
steps, of different lengths and settings, sharing a step; a cancelled one leaves at the next."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding import fast_step, packed_step, passes
from model.decoding.fast_step import switchboard
from model.decoding.hole import result as state_result
from model.decoding.passes import forward_holes
from model.decoding.prompt_cache import PromptCache
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
def passes_seen(monkeypatch) -> list[list[packed_step.Segment]]:
    """The segments of every packed pass that ran."""
    seen: list[list[packed_step.Segment]] = []
    original = packed_step.packed_pass

    def counted(model, segments, fused=False):
        seen.append(list(segments))
        return original(model, segments, fused)

    monkeypatch.setattr(packed_step, "packed_pass", counted)
    return seen


def largest(seen: list[list[packed_step.Segment]]) -> int:
    """The most holes one packed pass ran."""
    return max(map(len, seen), default=0)


def alone(model, holes, cache: PromptCache | None = None) -> list[tuple]:
    return [outcome(infill(model, prefix, suffix, options, cache=cache, document=document(i)))
            for i, (prefix, suffix, options) in enumerate(holes)]


def document(index: int) -> str:
    return f"file-{index}.py"


def first_passes_packed(seen: list[list[packed_step.Segment]]) -> dict[str, int]:
    """How many full and partial passes ran packed beside other holes' rows."""
    counts = {"full": 0, "partial": 0}
    for segments in seen:
        if len(segments) > 1:
            counts["full"] += sum(segment.past is None for segment in segments)
            counts["partial"] += sum(segment.keep and segment.past is not None
                                     for segment in segments)
    return counts


def outcome(result) -> tuple:
    return result.text, result.steps, result.full_passes, result.finish_reason


def staggered(model, holes, joins: list[int], cache: PromptCache | None = None) -> list[tuple]:
    """The holes denoised in one shared loop, hole i joining at step joins[i] (so holes at
    different steps share a step) and leaving as soon as it is finished. With a `cache`, hole
    i is in document `document(i)`."""
    states = [new_state(model, prefix, suffix, options) for prefix, suffix, options in holes]
    active, done, step = [], {}, 0
    while len(done) < len(states):
        for i in [i for i, join in enumerate(joins) if join == step]:
            active.append(i)
            if cache is not None:
                cache.attach(model, document(i), states[i])
        if active:
            denoise_step(model, [states[i] for i in active], cache,
                         [document(i) for i in active])
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
def test_greedy_completions_are_the_same_alone_and_in_any_batch(family_models, name,
                                                                passes_seen):
    model = family_models[name]
    assert packed_step.enabled(model)  # on a CPU too: measured faster than transformers'
    expected = alone(model, HOLES)
    assert staggered(model, HOLES, [0, 0, 0, 0, 0]) == expected
    assert staggered(model, HOLES, [0, 1, 3, 2, 5]) == expected
    assert staggered(model, HOLES[::-1], [4, 0, 2, 2, 1]) == expected[::-1]
    assert largest(passes_seen) >= 2  # the hole-only steps really were packed
    assert first_passes_packed(passes_seen)["full"] >= 5  # joining holes' passes with them


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_first_passes_share_the_packed_pass_and_fill_the_context_cache(family_models, name,
                                                                       monkeypatch):
    """Holes that join (a full pass), a document's hole one keystroke later (a partial pass
    over its reused context) and running holes (hole-only) share one packed pass, nothing
    through transformers; each gets the logits and the context cache it gets alone."""
    model = family_models[name]
    cache = PromptCache()
    prefix, suffix, options = HOLES[0]
    infill(model, prefix, suffix, options, cache=cache, document="a.py")

    def batch() -> list:
        joining = [new_state(model, p, s, o) for p, s, o in HOLES[1:3]]
        running = [new_state(model, p, s, o) for p, s, o in HOLES[3:]]
        for state in running:
            forward_holes(model, [state])  # their context caches
        typed = new_state(model, prefix + "x", suffix, options)
        cache.attach(model, "a.py", typed)
        assert typed.reuse is not None
        return [*joining, typed, *running]

    ones = batch()
    expected = [forward_holes(model, [state])[0] for state in ones]
    together = batch()

    def no_transformers(*args, **kwargs):
        raise AssertionError("a first pass went through transformers' forward")

    monkeypatch.setattr(model.network.model, "forward", no_transformers)
    got = forward_holes(model, together)
    for state, want, logits, one in zip(together, expected, got, ones, strict=True):
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
        assert (state.full_passes, state.context.age, state.reused_tokens) == (
            one.full_passes, one.context.age, one.reused_tokens)
        for mine, theirs in zip(state.context.layers, one.context.layers, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_documents_partial_passes_in_a_batch_complete_as_one_by_one(family_models, name,
                                                                    passes_seen):
    """Editors typing one more character each, their documents' contexts reused (a partial
    pass when each hole joins): the same greedy texts alone and in any batch."""
    model = family_models[name]

    def cached() -> PromptCache:
        cache = PromptCache()
        alone(model, HOLES, cache)
        return cache

    typed = [(prefix + "x", suffix, options) for prefix, suffix, options in HOLES]
    expected = alone(model, typed, cached())
    assert staggered(model, typed, [0, 1, 0, 2, 1], cached()) == expected
    assert first_passes_packed(passes_seen)["partial"] >= 3


def test_first_passes_apart_when_switched_off(family_models, monkeypatch, passes_seen):
    """DIFFUSION_LSP_PACKED_FIRST_PASSES=0: only hole-only steps are packed (the first passes
    share transformers' padded batch), with the same texts."""
    model = family_models["llada"]
    monkeypatch.setenv(packed_step.FIRST_PASSES_ENV, "0")
    assert staggered(model, HOLES, [0, 1, 3, 2, 5]) == alone(model, HOLES)
    assert largest(passes_seen) >= 2
    assert first_passes_packed(passes_seen) == {"full": 0, "partial": 0}


def test_the_transformers_batch_gives_them_too(family_models, monkeypatch):
    """With the packed step off, the batch goes through transformers' padded pass as before."""
    model = family_models["dream"]
    monkeypatch.setenv(packed_step.PACKED_ENV, "0")
    assert not packed_step.enabled(model)
    assert staggered(model, HOLES, [0, 1, 3, 2, 5]) == alone(model, HOLES)


def test_the_engine_packs_its_batch_and_a_cancelled_hole_leaves_at_the_next_step(
        tiny_model, passes_seen):
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
    assert largest(passes_seen) >= 3
    assert len(seen) <= 3  # it left within a step of its cancel (one may be in flight)


@pytest.mark.slow
@pytest.mark.skipif(bundled_model_path() is None, reason="no bundled model")
def test_the_bundled_model_completes_the_same_alone_and_in_a_batch(passes_seen):
    model = load_model(None, device="cpu")
    holes = [(prefix, suffix, InfillOptions(max_tokens=options.max_tokens,
                                            tokens_per_step=options.tokens_per_step))
             for prefix, suffix, options in HOLES]
    assert staggered(model, holes, [0, 1, 0, 2, 1]) == alone(model, holes)
    assert largest(passes_seen) >= 3


def window_parts(model, states) -> list:
    return [passes._window_part(model, state) for state in states]


def packed_windows(parts) -> list[fast_step.PackedWindow]:
    return [fast_step.PackedWindow(part.segment.ids, int(part.segment.positions[0]),
                                   part.segment.past, part.context) for part in parts]


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_a_bucketed_batch_computes_the_packed_passs_rows(family_models, name):
    """The packed graphs' batch (DIFFUSION_LSP_PACKED_GRAPHS; uncaptured here): holes padded
    to their bucket's seats, windows and context rows, the padding masked, give the rows of
    the unbucketed packed pass; a hole that stays keeps its seat when others leave and join,
    and a batch in the same bucket reuses its shape."""
    model = family_models[name]
    states = [new_state(model, prefix, suffix, options) for prefix, suffix, options in HOLES]
    for state in states:
        forward_holes(model, [state])
    steps = fast_step.HoleSteps(model, graphs=False)

    def compare(batch) -> None:
        parts = window_parts(model, batch)
        want, _ = packed_step.packed_pass(model, [part.segment for part in parts])
        got = steps.run_packed(packed_windows(parts))
        for mine, theirs in zip(got, want, strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)

    compare(states[:3])  # 4 seats, one spare
    seat = {id(state.context): index for index, state in enumerate(states[:3])}
    compare(states[1:5])  # 0 left, 3 and 4 joined: they take seat 0 and the spare one
    (shape,) = steps._shapes.values()
    assert shape.key.holes == 4
    assert [shape.seats[seat[id(s.context)]]() is s.context for s in states[1:3]] == [True] * 2
    compare(states[::-1])  # 5 holes: 8 seats
    assert sorted(key.holes for key in steps._shapes) == [4, 8]


def test_packed_buckets() -> None:
    assert fast_step.packed_bucket(1, 9, 10) == (2, 16, fast_step.CONTEXT_BUCKET)
    assert fast_step.packed_bucket(3, 17, 300) == (4, 32, 2 * fast_step.CONTEXT_BUCKET)
    assert fast_step.packed_bucket(16, 65, 256) == (16, 80, fast_step.CONTEXT_BUCKET)
    assert fast_step.packed_bucket(17, 64, 257)[0] == 32


@pytest.mark.parametrize("bound", ["ample", "none"])
def test_greedy_completions_are_the_same_through_the_bucketed_batch(family_models, monkeypatch,
                                                                    bound, passes_seen):
    """With DIFFUSION_LSP_PACKED_GRAPHS (every pass as on CUDA, eager here), batched hole-only
    steps run as bucketed batches and complete as each hole alone; a bucket over its memory
    bound runs the uncaptured packed pass instead, with the same texts."""
    from . import helpers

    model = family_models["dream"]
    steps = helpers.as_on_cuda(monkeypatch, model, {fast_step.PACKED_GRAPHS_ENV: "1"})
    if bound == "none":
        helpers.patch_fast_step(monkeypatch, "MAX_PACKED_BYTES", 0)
    expected = alone(model, HOLES)
    assert staggered(model, HOLES, [0, 1, 3, 2, 5]) == expected
    packed = [key for key in steps._shapes if key.kind == "packed"]
    assert bool(packed) == (bound == "ample")
    windows = [segment for segments in passes_seen for segment in segments
               if segment.past is not None and not segment.keep]  # hole-only, uncaptured
    assert bool(windows) == (bound == "none")
    full = [segment for segments in passes_seen for segment in segments
            if segment.past is None]
    assert len(full) >= 5  # the joining holes' first passes, packed beside the batch
    if bound == "ample":  # documents' partial passes beside the bucketed batch too
        typed = [(prefix + "x", suffix, options) for prefix, suffix, options in HOLES]
        first, second = PromptCache(), PromptCache()
        alone(model, HOLES, first)
        alone(model, HOLES, second)
        assert staggered(model, typed, [0, 1, 0, 2, 1], second) == alone(model, typed, first)
        assert first_passes_packed(passes_seen)["partial"] >= 1


def test_the_packed_graphs_switch_is_off_on_a_cpu_and_says_so_once(family_models, monkeypatch,
                                                                  caplog, passes_seen):
    model = family_models["llada"]
    monkeypatch.setenv(fast_step.PACKED_GRAPHS_ENV, "1")
    monkeypatch.setattr(switchboard, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=switchboard.__name__):
        assert staggered(model, HOLES, [0, 0, 1, 1, 2]) == alone(model, HOLES)
    assert not fast_step.switches(model).packed_graphs
    said = [r for r in caplog.records if fast_step.PACKED_GRAPHS_ENV in r.getMessage()]
    assert len(said) == 1
    assert largest(passes_seen) >= 2  # the uncaptured packed pass ran
