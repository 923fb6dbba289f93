"""The fixed-shape hole step (model/decoding/fast_step/) computes what the sampler's hole-only pass
through transformers computes, on every published family's tiny checkpoint (CPU, eager: the
CUDA graph replays these same kernels, tests/test_cuda.py); so do its switches (the graph
head, fused projections, captured passes), run here eagerly as the graphs would run them."""

from __future__ import annotations

import logging

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding import fast_step
from model.decoding.fast_step import graphs, layer
from model.decoding.passes import forward_holes, window
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import apply_step, infill, new_state
from model.decoding.scoring import (
    Scored,
    ban_early_ends,
    greedy_scores,
    pick,
    sample_and_score,
    sampleable,
    step_head,
)
from model.network.loader import load_model
from model.network.published import FAMILY_SPECS, write_checkpoint

from .helpers import as_on_cuda, hole_pass_both_ways, patch_fast_step

PREFIX = "def add(a, b):\n    total = a + b\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
ALL_ON = {fast_step.GRAPH_HEAD_ENV: "1", fast_step.FUSED_PROJECTIONS_ENV: "1",
          fast_step.GRAPH_PASSES_ENV: "1"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fast-step-families")
    return {name: write_checkpoint(root / name, name) for name in FAMILY_SPECS}


@pytest.fixture(scope="module")
def family_models(family_dirs) -> dict:
    return {name: load_model(path, device="cpu", dtype="float32")
            for name, path in family_dirs.items()}


def fresh(family_dirs, name: str):
    """A model of its own (fusing the projections changes the network it is given)."""
    return load_model(family_dirs[name], device="cpu", dtype="float32")


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
        from model.decoding.passes import _hole_pass

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
    """Whole completions with every pass through `model.decoding.fast_step` as on CUDA (full passes,
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
    patch_fast_step(monkeypatch, "enabled", lambda m: True)
    patch_fast_step(monkeypatch, "hole_steps", lambda m: steps)
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
    assert layer._Layers(model.network, torch.device("cpu")).compiled is False  # CPU: no


def test_kept_shapes_are_bounded_in_count_and_bytes(family_models, monkeypatch):
    model = family_models["dream"]
    steps = fast_step.HoleSteps(model, graphs=False)
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, refresh_every=0))
    forward_holes(model, [state])
    start, end = window(state, True)
    patch_fast_step(monkeypatch, "MAX_GRAPHS", 2)
    for width in (3, 4, 5):  # three windows: the oldest goes
        steps.run(state.context.layers, state.context, state.sequence()[start:start + width],
                  start)
    assert [key.width for key in steps._shapes] == [4, 5]
    patch_fast_step(monkeypatch, "MAX_BUFFER_BYTES", steps.buffer_bytes // 2)
    steps.run(state.context.layers, state.context, state.sequence()[start:start + 6], start)
    assert [key.width for key in steps._shapes] == [6]  # over the bytes: only the newest is kept


# -- the switches ------------------------------------------------------------------------------


def test_switch_values_and_their_defaults(caplog):
    assert fast_step.parse_switch("X", None) is False
    assert fast_step.parse_switch("X", "") is False
    assert fast_step.parse_switch("X", " On ") is True and fast_step.parse_switch("X", "1")
    assert fast_step.parse_switch("X", "0", default=True) is False
    with caplog.at_level(logging.WARNING, logger="model.decoding.fast_step"):
        assert fast_step.parse_switch("X", "maybe") is False  # logged, the default kept
        assert fast_step.parse_switch("X", "maybe", default=True) is True
    assert len([r for r in caplog.records if "maybe" in r.getMessage()]) == 1  # once
    assert "known: 1, on" in caplog.records[0].getMessage()


def test_switches_stay_off_where_the_fast_step_does_not_run(family_models, monkeypatch):
    """On a CPU (as shipped) every switch is off whatever the environment says; set, they
    take effect where the fast step runs (CUDA)."""
    model = family_models["dream"]
    for variable, value in ALL_ON.items():
        monkeypatch.setenv(variable, value)
    assert fast_step.switches(model) == fast_step.Switches()
    patch_fast_step(monkeypatch, "enabled", lambda m: True)
    assert fast_step.switches(model) == fast_step.Switches(True, True, True)
    monkeypatch.setenv(fast_step.FUSED_PROJECTIONS_ENV, "0")
    assert fast_step.switches(model) == fast_step.Switches(True, False, True)


def test_padding_of_captured_passes():
    assert fast_step.round_up(1, 64) == fast_step.round_up(64, 64) == 64
    assert fast_step.round_up(65, 64) == 128
    assert fast_step.pass_shape(300, 0) == (320, 0)  # a full pass: no reused rows
    assert fast_step.pass_shape(70, 200) == (128, 256)  # a partial pass
    assert fast_step.pass_shape(1024, 0) == (1024, 0)
    assert fast_step.pass_shape(1025, 0) is None  # too long: runs uncaptured
    assert fast_step.pass_shape(64, 1000) is None
    assert fast_step.MAX_GRAPHS == 16


# -- the graph head ----------------------------------------------------------------------------


HEAD_OPTIONS = [
    InfillOptions(initial_tokens=10, refresh_every=0),
    InfillOptions(initial_tokens=10, refresh_every=0, min_tokens=4, single_line=True),
    InfillOptions(initial_tokens=10, max_tokens=10, refresh_every=0, min_tokens=10,
                  score="margin"),
    InfillOptions(initial_tokens=10, refresh_every=0, score="entropy", min_tokens=2),
    InfillOptions(initial_tokens=10, refresh_every=0, algorithm="low_confidence", steps=5,
                  max_tokens=10, top_k=5),
]


@pytest.mark.parametrize("options", HEAD_OPTIONS, ids=range(len(HEAD_OPTIONS)))
@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_greedy_scores_are_what_apply_step_computes(family_models, name, options):
    """The graph head's scoring of all the hole's rows, read at the masked ones, gives the
    tokens and confidences `apply_step`'s bans and `sample_and_score` give those rows: the
    same numbers, on the same logits."""
    model = family_models[name]
    state = new_state(model, PREFIX, SUFFIX, options)
    state.hole[1], state.masked[1] = 7, False  # a committed position: not scored
    if model.ids.expand is not None:
        state.expansions_left = 0  # DreamOn's expand is banned now
    rows = state.hole.numel()
    generator = torch.Generator().manual_seed(len(name))
    logits = torch.randn((rows, model.vocab_size), generator=generator) * 3
    logits[:, list(model.ids.ends)] += 4  # ends likely: the bans must matter
    masked = state.masked.nonzero().squeeze(-1)
    eager = sampleable(model, state, logits[masked].clone())
    if options.min_tokens > 0:
        eager = ban_early_ends(model, eager, masked, options)
    rule = options.rule
    tokens, raw = sample_and_score(eager, rule.score, 0.0, None, options.top_p, options.top_k,
                                   rule.noise)
    head, bans = step_head(model, state)
    scores = greedy_scores(logits.clone(), head, model.never_sample_ids,
                           torch.tensor(head.columns), bans)
    assert torch.equal(scores[0, masked].long(), tokens)
    assert torch.equal(scores[1, masked], raw)
    early = [token for position, token in zip(masked.tolist(), tokens.tolist(), strict=True)
             if position < options.min_tokens]
    assert not set(early) & model.ids.ends  # banned there (elsewhere the likeliest)


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_a_scored_step_commits_what_the_logits_commit(family_models, name, monkeypatch):
    """forward_holes(scored=True) with the graph head returns the step `Scored`; applied, it
    commits what the step's logits commit."""
    model = family_models[name]
    options = InfillOptions(initial_tokens=12, refresh_every=0, min_tokens=3, threshold=0.0)
    as_on_cuda(monkeypatch, model, {fast_step.GRAPH_HEAD_ENV: "1"})
    states = [new_state(model, PREFIX, SUFFIX, options) for _ in range(2)]
    for state in states:
        forward_holes(model, [state])  # the full pass: its context cached
        state.hole[2], state.masked[2] = 7, False
    (logits,) = forward_holes(model, [states[0]])
    (scored,) = forward_holes(model, [states[1]], scored=True)
    assert isinstance(logits, torch.Tensor) and isinstance(scored, Scored)
    assert scored.tokens.shape == (11,) and scored.vocab == logits.shape[-1]
    masked = states[0].masked.nonzero().squeeze(-1)
    assert torch.equal(pick(states[0], scored, masked)[0], pick(states[0], logits, masked)[0])
    apply_step(model, states[0], logits)
    apply_step(model, states[1], scored)
    assert states[0].trace[-1] == states[1].trace[-1] and states[1].trace[-1].committed
    assert states[1].context.age == states[0].context.age == 1


def test_only_greedy_hole_steps_are_scored_in_the_graph(family_models, monkeypatch):
    model = family_models["dream"]
    steps = as_on_cuda(monkeypatch, model, {fast_step.GRAPH_HEAD_ENV: "1"})
    sampled = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, temperature=1.0,
                                                             refresh_every=0))
    greedy = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, refresh_every=0))
    for state in (sampled, greedy):
        (first,) = forward_holes(model, [state], scored=True)  # a full pass: logits
        assert isinstance(first, torch.Tensor)
    (drawn,) = forward_holes(model, [sampled], scored=True)  # random draws: on the host
    assert isinstance(drawn, torch.Tensor) and drawn.device.type == "cpu"
    assert isinstance(forward_holes(model, [greedy], scored=True)[0], Scored)
    both = forward_holes(model, [greedy, greedy], scored=True)  # batched: logits
    assert all(isinstance(x, torch.Tensor) for x in both)
    assert [key.head is not None for key in steps._shapes] == [False, True]
    monkeypatch.setenv(fast_step.GRAPH_HEAD_ENV, "0")
    assert isinstance(forward_holes(model, [greedy], scored=True)[0], torch.Tensor)


# -- fused projections -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dream", "llada", "open-dcoder"])
def test_fused_projections_compute_what_the_modules_did(family_dirs, name):
    """q/k/v and gate/up stacked: one matrix product each, the same numbers (up to the
    products' rounding), every value held once, and the modules unchanged to transformers."""
    model = fresh(family_dirs, name)
    network = model.network
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, refresh_every=0))
    forward_holes(model, [state])
    start, end = window(state, model.family.shifted_logits)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    ids = torch.tensor([state.sequence().tolist()])
    before_modules = network.model(input_ids=ids).last_hidden_state
    before = fast_step.HoleSteps(model, graphs=False).run(*args).clone()
    parameters = sum(p.numel() for p in network.parameters())
    layers = fast_step.layers_of(network)
    layers.fuse()
    assert layers.generation == 1 and layers.fused_weights is not None
    after = fast_step.HoleSteps(model, graphs=False).run(*args, fused=True)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    attention, mlp = network.model.layers[0].self_attn, network.model.layers[0].mlp
    qkv, gate_up = layers.fused_weights[0].qkv, layers.fused_weights[0].gate_up
    for module, fused in ((attention.q_proj, qkv), (attention.k_proj, qkv),
                          (attention.v_proj, qkv), (mlp.gate_proj, gate_up),
                          (mlp.up_proj, gate_up)):  # views into the fused weights
        assert module.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert qkv.shape[0] == sum(m.weight.shape[0] for m in (attention.q_proj, attention.k_proj,
                                                         attention.v_proj))
    assert sum(p.numel() for p in network.parameters()) == parameters
    assert torch.equal(network.model(input_ids=ids).last_hidden_state, before_modules)
    layers.fuse()  # once only
    assert layers.generation == 1


def test_fusing_drops_the_graphs_captured_over_the_old_weights(family_dirs):
    model = fresh(family_dirs, "dream")
    steps = fast_step.HoleSteps(model, graphs=False)
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, refresh_every=0))
    forward_holes(model, [state])
    start, end = window(state, True)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    steps.run(*args)
    assert len(steps._shapes) == 1
    steps.run(*args, fused=True)  # fuses: the unfused shape read the old weights' memory
    assert [key.fused for key in steps._shapes] == [True]
    steps.run(*args)  # the unfused step over the modules' views: a shape of its own
    assert [key.fused for key in steps._shapes] == [True, False]


# -- captured passes ---------------------------------------------------------------------------


def test_a_padded_pass_is_the_rows_pass(family_models, monkeypatch):
    """Full and partial passes on static shapes (queries padded, reused rows bucketed,
    padding masked) give the rows_pass's hidden states and keys/values."""
    model = family_models["dream"]
    sequence = model.tokenizer.encode(PREFIX * 3 + SUFFIX, add_special_tokens=False).ids
    ids = torch.tensor(sequence)
    count = ids.numel()
    positions = torch.arange(count)
    plain_hidden, plain_rows = fast_step.rows_pass(model, ids, positions)  # unpadded (CPU)
    steps = as_on_cuda(monkeypatch, model, {fast_step.GRAPH_PASSES_ENV: "1"})
    hidden, rows = fast_step.rows_pass(model, ids, positions)
    torch.testing.assert_close(hidden, plain_hidden, atol=1e-5, rtol=1e-4)
    for (k, v), (plain_k, plain_v) in zip(rows, plain_rows, strict=True):
        assert k.shape == plain_k.shape
        torch.testing.assert_close(k, plain_k, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, plain_v, atol=1e-5, rtol=1e-4)
    kept = 20  # a partial pass: the rest against the first rows
    past = [(k[..., :kept, :].clone(), v[..., :kept, :].clone()) for k, v in plain_rows]
    hidden, rows = fast_step.rows_pass(model, ids[kept:], positions[kept:], past)
    torch.testing.assert_close(hidden, plain_hidden[kept:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rows[0][0], plain_rows[0][0], atol=1e-5, rtol=1e-4)
    assert [(key.kind, key.width, key.rows) for key in steps._shapes] == [
        ("pass", fast_step.round_up(count, 64), 0),
        ("pass", fast_step.round_up(count - kept, 64), 256)]
    patch_fast_step(monkeypatch, "MAX_PASS_ROWS", 64)  # over it: uncaptured, as before
    hidden, _ = fast_step.rows_pass(model, ids, positions)
    torch.testing.assert_close(hidden, plain_hidden, atol=1e-5, rtol=1e-4)
    assert len(steps._shapes) == 2


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_every_switch_on_gives_the_same_completions(family_dirs, name, monkeypatch):
    """Whole completions (full passes, the document cache's partial pass, hole-only steps)
    through the layer loop with the graph head, fused projections and captured passes, as
    they would run on CUDA, against the same loop with every switch off: same texts, same
    passes, same reuse; every switch did run."""
    model = fresh(family_dirs, name)
    options = [InfillOptions(max_tokens=16, initial_tokens=16, tokens_per_step=2),
               InfillOptions(max_tokens=12, initial_tokens=8, min_tokens=3, refresh_every=3,
                             single_line=True)]

    def complete() -> list:
        cache = PromptCache()
        return [infill(model, PREFIX + extra, SUFFIX, o, cache=cache, document="a.py")
                for o in options for extra in ("", "x")]

    as_on_cuda(monkeypatch, model, {})
    plain = complete()
    steps = as_on_cuda(monkeypatch, model, ALL_ON)
    switched = complete()
    for a, b in zip(plain, switched, strict=True):
        assert (b.text, b.steps, b.full_passes, b.reused_tokens) == \
            (a.text, a.steps, a.full_passes, a.reused_tokens)
    kinds = {(key.kind, key.fused, key.head is not None) for key in steps._shapes}
    hole_only = sum(r.steps - r.full_passes - (r.reused_tokens > 0) for r in switched)
    assert ("pass", True, False) in kinds
    assert ("hole", True, True) in kinds or hole_only == 0
    assert fast_step.layers_of(model.network).fused_weights is not None


def test_a_shape_whose_capture_fails_runs_eagerly_and_the_others_keep_their_graphs(
        family_models, monkeypatch, caplog):
    """A capture is tried once per shape: one that fails (here: any shape with a graph head)
    runs eagerly from then on, with one warning; plain steps still replay their graphs. (On a
    CPU the 'graph' is a stand-in that replays the eager forward.)"""
    model = family_models["dream"]
    steps = fast_step.HoleSteps(model, graphs=True)
    tried = []

    class Replayed:
        def __init__(self, shape):
            self.shape = shape

        def replay(self):
            self.shape.output = steps._forward(self.shape)

    def capture(shape):
        tried.append(shape.key.head is not None)
        if shape.key.head is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        shape.graph, shape.output = Replayed(shape), steps._forward(shape)
        steps.captures += 1

    monkeypatch.setattr(steps, "_capture", capture)
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8, refresh_every=0))
    forward_holes(model, [state])
    start, end = window(state, True)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    head, bans = step_head(model, state)
    with caplog.at_level(logging.WARNING, logger=graphs.log.name):
        for _ in range(3):
            plain = steps.run(*args).clone()
            scored = steps.run(*args, head=head, bans=bans).clone()
    assert tried == [False, True]  # each shape's capture tried once
    assert steps.captures == 1 and steps.capture_failures == 1 and steps.replays == 2
    assert steps.graphs  # the failure did not turn graphs off for the other shapes
    assert sum("failed; that shape runs uncaptured" in r.message for r in caplog.records) == 1
    assert scored.shape == (2, head.rows) and plain.shape[0] == end - start


def test_the_layer_may_compile_more_variants_than_torch_allows_by_default():
    import torch._dynamo

    # by hand, not monkeypatch: its undo deletes a torch config entry (then hidden for good),
    # and every later torch.compile in the session fails reading it
    config = torch._dynamo.config
    saved = config.recompile_limit
    config.recompile_limit = 8
    try:
        fast_step.allow_recompiles()
        assert config.recompile_limit == fast_step.RECOMPILE_LIMIT > 8
    finally:
        config.recompile_limit = saved


def test_copies_of_a_model_share_its_networks_hole_steps(tiny_models):
    """One cache per network: a LoadedModel copied with other ids (exact mode's) captures no
    second set of graphs."""
    import dataclasses

    model = tiny_models["default"]
    copy = dataclasses.replace(model, ids=dataclasses.replace(model.ids, end_of_hole=-1))
    assert fast_step.hole_steps(copy) is fast_step.hole_steps(model)
    assert fast_step.layers_of(model.network).steps is fast_step.hole_steps(model)
