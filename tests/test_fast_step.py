"""The fixed-shape hole step (model/fast_step.py) computes what the sampler's hole-only pass
through transformers computes, on every published family's tiny checkpoint (CPU, eager: the
CUDA graph replays these same kernels, tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from model import fast_step
from model.loader import load_model
from model.prompt_cache import PromptCache
from model.sampler import InfillOptions, forward_holes, infill, new_state, window

from .fixtures_families import FAMILY_SPECS, write_checkpoint

PREFIX = "def add(a, b):\n    total = a + b\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fast-step-families")
    return {name: load_model(write_checkpoint(root / name, name), device="cpu", dtype="float32")
            for name in FAMILY_SPECS}


def hole_pass_both_ways(model, state) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the window: transformers' hole-only pass, then the fixed-shape step."""
    from model.sampler import _hole_pass

    (reference,) = _hole_pass(model, [state])
    state.context.age -= 1
    start, end = window(state, model.family.shifted_logits)
    steps = fast_step.HoleSteps(model, graphs=False)
    hidden = steps.run(state.context.layers, state.context, state.sequence()[start:end], start)
    masked = state.masked.nonzero().squeeze(-1) + state.hole_start
    rows = masked - (1 if model.family.shifted_logits else 0) - start
    return reference, hidden[rows]


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_the_fixed_shape_step_is_the_hole_only_pass(family_models, name):
    model = family_models[name]
    assert fast_step.supported(model)
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=12, refresh_every=0))
    forward_holes(model, [state])  # a full pass fills the context cache
    state.hole[3] = state.hole[5] = model.tokenizer.token_to_id("a") or 7  # some committed
    state.masked[3] = state.masked[5] = False
    reference, fixed = hole_pass_both_ways(model, state)
    torch.testing.assert_close(fixed, reference, atol=1e-5, rtol=1e-4)


def test_buffers_follow_a_new_context_and_a_wider_window(family_models):
    """The same HoleSteps serves a second hole (new context rows, another bucket) and a grown
    window; each answer matches transformers' pass."""
    model = family_models["dream"]
    steps = fast_step.HoleSteps(model, graphs=False)
    shapes = set()
    for prefix, tokens in ((PREFIX, 8), (PREFIX * 80, 8), (PREFIX, 16)):
        state = new_state(model, prefix, SUFFIX, InfillOptions(initial_tokens=tokens,
                                                               refresh_every=0))
        forward_holes(model, [state])
        from model.sampler import _hole_pass

        (reference,) = _hole_pass(model, [state])
        start, end = window(state, model.family.shifted_logits)
        hidden = steps.run(state.context.layers, state.context, state.sequence()[start:end],
                           start)
        rows = state.masked.nonzero().squeeze(-1) + state.hole_start - 1 - start  # shifted
        torch.testing.assert_close(hidden[rows], reference, atol=1e-5, rtol=1e-4)
        shapes.add((end - start, fast_step.bucket(state.context.layers[0][0].shape[-2])))
    assert len(shapes) == 3 and len(steps._shapes) == 3  # two buckets, two windows
    assert fast_step.bucket(1) == fast_step.bucket(256) == 256 and fast_step.bucket(257) == 512


def test_the_sampler_uses_it_only_on_cuda(family_models, monkeypatch):
    """On a CPU the hole steps stay transformers' (as measured there); the switch and the
    environment variable decide on CUDA."""
    model = family_models["dream"]
    assert not fast_step.enabled(model)
    monkeypatch.setattr(model, "device", torch.device("cuda"))
    assert fast_step.enabled(model)
    monkeypatch.setenv(fast_step.DISABLE_ENV, "0")
    assert not fast_step.enabled(model)


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_whole_completions_through_the_layer_loop_give_the_same_text(family_models, name,
                                                                      monkeypatch):
    """Whole completions with every pass through `model.fast_step` as on CUDA (full passes,
    the document cache's partial pass, hole-only steps; eager here) against the sampler
    through transformers, as it runs on a CPU: same texts, same passes, same reuse."""
    model = family_models[name]
    options = InfillOptions(max_tokens=16, initial_tokens=16, tokens_per_step=2)

    def complete() -> list:
        cache = PromptCache()
        return [infill(model, PREFIX, SUFFIX, options, cache=cache, document="a.py"),
                infill(model, PREFIX + "x", SUFFIX, options, cache=cache, document="a.py")]

    plain = complete()
    steps = fast_step.HoleSteps(model, graphs=False)
    monkeypatch.setattr(fast_step, "enabled", lambda m: True)
    monkeypatch.setattr(fast_step, "hole_steps", lambda m: steps)
    fixed = complete()
    for a, b in zip(plain, fixed, strict=True):
        assert (b.text, b.steps, b.full_passes, b.reused_tokens) == \
            (a.text, a.steps, a.full_passes, a.reused_tokens)
    assert fixed[1].reused_tokens > 0
    assert steps._shapes or all(r.steps == 1 for r in fixed)  # hole-only steps ran


def test_the_decoder_layer_compiles_as_one_graph(family_models, monkeypatch):
    """torch.compile (fullgraph: no graph breaks) takes the layer function; on CUDA inductor
    then fuses it. Traced here with the eager backend, which checks the trace, not codegen."""
    model = family_models["dream"]
    layers = fast_step.layers_of(model.network)
    monkeypatch.setattr(layers, "function", torch.compile(fast_step.decoder_layer,
                                                          fullgraph=True, backend="eager"))
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, refresh_every=0))
    forward_holes(model, [state])
    reference, compiled = hole_pass_both_ways(model, state)
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-4)
    assert fast_step._Layers(model.network, torch.device("cpu")).compiled is False  # CPU: no


def test_kept_shapes_are_bounded_in_count_and_bytes(family_models, monkeypatch):
    model = family_models["dream"]
    steps = fast_step.HoleSteps(model, graphs=False)
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, refresh_every=0))
    forward_holes(model, [state])
    start, end = window(state, True)
    monkeypatch.setattr(fast_step, "MAX_GRAPHS", 2)
    for width in (3, 4, 5):  # three windows: the oldest goes
        steps.run(state.context.layers, state.context, state.sequence()[start:start + width],
                  start)
    assert [key[0] for key in steps._shapes] == [4, 5]
    monkeypatch.setattr(fast_step, "MAX_BUFFER_BYTES", steps.buffer_bytes // 2)
    steps.run(state.context.layers, state.context, state.sequence()[start:start + 6], start)
    assert [key[0] for key in steps._shapes] == [6]  # over the bytes: only the newest is kept
