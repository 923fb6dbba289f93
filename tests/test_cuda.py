"""On CUDA: the loader, every family in bf16 and fp32, the sampler and engine, the context
caches, batching, the fixed-shape step (CUDA graphs) and its switches (graph head, fused
projections, captured passes), and the language server end to end.

Marked `cuda`; skipped where no GPU is (CI). `scripts/gpu-check.sh` runs them on a borrowed
GPU first (`pytest -m cuda`). Where the CPU's answer is exact (the same network in fp32, the
same greedy choices), the GPU's is compared with it; random tiny networks are close to ties
everywhere, so those comparisons are of logits within float tolerance, and of texts on the
trained bundled model.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu_check import relative_error
from diffusion_contract.options import InfillOptions
from model.decoding import fast_step
from model.decoding.passes import _hole_pass, forward_holes, window
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import infill, new_state
from model.engine import Engine
from model.network.loader import load_model
from model.network.published import FAMILY_SPECS, write_checkpoint

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SWITCHES = {"graph_head": {fast_step.GRAPH_HEAD_ENV: "1"},
            "fused_projections": {fast_step.FUSED_PROJECTIONS_ENV: "1"},
            "graph_passes": {fast_step.GRAPH_PASSES_ENV: "1"},
            "all": {fast_step.GRAPH_HEAD_ENV: "1", fast_step.FUSED_PROJECTIONS_ENV: "1",
                    fast_step.GRAPH_PASSES_ENV: "1"}}

PREFIX = "def add(a, b):\n    total = a + b\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
HOLES = [
    ("def is_even(n):\n    return ", "\n"),
    ("import os\n\n\ndef home():\n    path = ", "\n    return path\n"),
    ("class Stack:\n    def __init__(self):\n        self.items = ", "\n"),
    ("def mean(values):\n    total = sum(values)\n    return ", "\n"),
    ("for i in range(10):\n    ", "\nprint('done')\n"),
    ("def greet(name):\n    print(", ")\n"),
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cuda-families")
    return {name: write_checkpoint(root / name, name) for name in FAMILY_SPECS}


@pytest.fixture(scope="module")
def bundled_pair():
    """The bundled model in fp32 on the CPU and on the GPU."""
    return load_model(None, device="cpu", dtype="float32"), \
        load_model(None, device="cuda", dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_every_family_loads_and_fills_on_cuda(family_dirs, name, dtype):
    model = load_model(family_dirs[name], device="cuda", dtype=dtype)
    assert all(p.device.type == "cuda" for p in model.network.parameters())
    assert model.dtype == getattr(torch, dtype)
    result = infill(model, PREFIX, SUFFIX, InfillOptions(max_tokens=16, min_tokens=1))
    assert result.steps >= 1 and result.tokens >= 1
    specials = [model.tokenizer.id_to_token(i) for i in model.never_sample_ids.tolist()]
    assert not [t for t in specials if t and t.startswith("<|") and t in result.text]
    cpu = load_model(family_dirs[name], device="cpu", dtype=dtype)
    state_gpu = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=8))
    state_cpu = new_state(cpu, PREFIX, SUFFIX, InfillOptions(initial_tokens=8))
    (on_gpu,) = forward_holes(model, [state_gpu])
    (on_cpu,) = forward_holes(cpu, [state_cpu])
    assert on_gpu.device.type == "cuda"  # greedy steps are scored where the logits are
    assert relative_error(on_gpu, on_cpu) < (1e-4 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_the_cuda_graph_step_is_the_hole_only_pass(family_dirs, name, dtype):
    model = load_model(family_dirs[name], device="cuda", dtype=dtype)
    assert fast_step.enabled(model)
    steps = fast_step.HoleSteps(model)
    assert steps.graphs
    for prefix in (PREFIX, PREFIX * 40):  # two context buckets
        state = new_state(model, prefix, SUFFIX, InfillOptions(initial_tokens=12,
                                                               refresh_every=0))
        forward_holes(model, [state])
        for _ in range(2):  # the capture, then a replay
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv(fast_step.DISABLE_ENV, "0")
                (reference,) = _hole_pass(model, [state])
            start, end = window(state, model.family.shifted_logits)
            hidden = steps.run(state.context.layers, state.context,
                               state.sequence()[start:end], start)
            shift = 1 if model.family.shifted_logits else 0
            rows = state.masked.nonzero().squeeze(-1) + state.hole_start - shift - start
            error = relative_error(hidden[rows.cuda()], reference)
            assert error < (1e-4 if dtype == "float32" else 2e-2)
            state.hole[2], state.masked[2] = 5, False  # a token committed between steps
    assert steps.captures == 2 and steps.replays == 2


def test_graph_replays_equal_eager_runs(family_dirs):
    model = load_model(family_dirs["dream"], device="cuda", dtype="bfloat16")
    graphed, eager = fast_step.HoleSteps(model), fast_step.HoleSteps(model, graphs=False)
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=16, refresh_every=0))
    forward_holes(model, [state])
    start, end = window(state, True)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    graphed.run(*args)
    assert relative_error(graphed.run(*args).clone(), eager.run(*args)) < 1e-2


def test_bundled_model_gives_the_cpu_texts_on_cuda(bundled_pair):
    """fp32, greedy: the same completions on the GPU as on the CPU (the CUDA graph step and
    GPU scoring included); near-ties may flip a rare token, so most, not all, must match."""
    cpu, gpu = bundled_pair
    options = InfillOptions(max_tokens=24, min_tokens=1)
    same = sum(infill(cpu, p, s, options).text == infill(gpu, p, s, options).text
               for p, s in HOLES)
    assert same >= len(HOLES) - 1
    assert fast_step.layers_of(gpu.network).steps is not None
    assert fast_step.hole_steps(gpu).replays > 0


def test_sampling_with_temperature_is_seeded_on_cuda(bundled_pair):
    _, gpu = bundled_pair
    options = InfillOptions(max_tokens=16, temperature=1.0, seed=3, top_p=0.9)
    assert infill(gpu, PREFIX, SUFFIX, options).text == infill(gpu, PREFIX, SUFFIX, options).text
    lladas = InfillOptions(max_tokens=16, algorithm="low_confidence", steps=8, temperature=0.5)
    assert infill(gpu, PREFIX, SUFFIX, lladas).finish_reason in ("max_tokens", "end")


def test_the_document_cache_reuses_context_on_cuda(bundled_pair):
    _, gpu = bundled_pair
    cache = PromptCache()
    options = InfillOptions(max_tokens=24, min_tokens=1)
    plain = infill(gpu, PREFIX, SUFFIX, options)
    first = infill(gpu, PREFIX, SUFFIX, options, cache=cache, document="a.py")
    again = infill(gpu, PREFIX, SUFFIX, options, cache=cache, document="a.py")
    assert again.reused_tokens > 0 and first.reused_tokens == 0
    assert plain.text == first.text == again.text  # the document did not change: exact
    assert all(k.device.type == "cuda" for k, _ in cache._entries["a.py"].layers)


def test_engine_batches_on_cuda_as_alone(bundled_pair):
    _, gpu = bundled_pair
    engine = Engine(gpu, max_batch=8)
    try:
        options = InfillOptions(max_tokens=24, min_tokens=1)
        alone = [engine.submit(p, s, options).result(120).text for p, s in HOLES]
        requests = [engine.submit(p, s, options) for p, s in HOLES]
        together = [r.result(120).text for r in requests]
    finally:
        engine.close()
    assert sum(a == b for a, b in zip(alone, together, strict=True)) >= len(HOLES) - 1
    assert engine.batched_rows > engine.forward_passes  # steps were shared


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_packed_steps_are_each_holes_own_pass_on_cuda(family_dirs, name, dtype, monkeypatch):
    """Several holes' hole-only steps packed into one pass (model.decoding.packed_step) give each
    hole's hidden states as its own pass through transformers does (logits within float
    tolerance: random tiny networks are close to ties everywhere)."""
    from model.decoding import packed_step, passes

    model = load_model(family_dirs[name], device="cuda", dtype=dtype)
    assert packed_step.enabled(model)
    states = [new_state(model, prefix, suffix, InfillOptions(initial_tokens=tokens,
                                                             refresh_every=0))
              for (prefix, suffix), tokens in zip(HOLES, (8, 12, 16, 24, 9, 33), strict=True)]
    for state in states:
        forward_holes(model, [state])
    monkeypatch.setenv(fast_step.DISABLE_ENV, "0")  # one hole alone: transformers' pass
    reference = [_hole_pass(model, [state])[0] for state in states]
    monkeypatch.delenv(fast_step.DISABLE_ENV)
    packed = passes._hole_pass(model, states)
    for got, want in zip(packed, reference, strict=True):
        assert relative_error(got, want) < (1e-4 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_packed_graphs_replay_the_uncaptured_packed_pass(family_dirs, name, dtype):
    """DIFFUSION_LSP_PACKED_GRAPHS: batched hole-only steps as a bucketed batch, captured once
    per bucket and replayed, give the uncaptured packed pass's rows; holes leaving and joining
    within a bucket replay its graph (their contexts copied into their seats)."""
    from model.decoding import packed_step, passes

    model = load_model(family_dirs[name], device="cuda", dtype=dtype)
    states = [new_state(model, prefix, suffix, InfillOptions(initial_tokens=tokens,
                                                             refresh_every=0))
              for (prefix, suffix), tokens in zip(HOLES, (8, 12, 16, 24, 9, 33), strict=True)]
    for state in states:
        forward_holes(model, [state])
    steps = fast_step.HoleSteps(model)
    for batch in (states[:3], states[1:5], states[2:5], states):
        parts = [passes._window_part(model, state) for state in batch]
        want, _ = packed_step.packed_pass(model, [part.segment for part in parts])
        got = steps.run_packed([fast_step.PackedWindow(
            part.segment.ids, int(part.segment.positions[0]), part.segment.past, part.context)
            for part in parts])
        for mine, theirs in zip(got, want, strict=True):
            assert relative_error(mine, theirs) < (1e-4 if dtype == "float32" else 2e-2)
    assert steps.capture_failures == 0
    assert steps.captures == len(steps._shapes) >= 2  # a graph per bucket: 4 holes, 8 holes
    assert steps.replays >= 1  # states[2:5] in states[1:5]'s bucket


def test_the_engine_with_packed_graphs_gives_the_texts_of_one_by_one(bundled_pair,
                                                                     monkeypatch):
    """The bundled model in fp32 with DIFFUSION_LSP_PACKED_GRAPHS: holes sharing steps
    replay bucketed graphs and complete as each alone (all but one text, near-ties)."""
    _, gpu = bundled_pair
    monkeypatch.setenv(fast_step.PACKED_GRAPHS_ENV, "1")
    steps = fast_step.hole_steps(gpu)
    replays = steps.replays
    engine = Engine(gpu, max_batch=8)
    try:
        options = [InfillOptions(max_tokens=8 + 4 * i, min_tokens=1) for i in range(len(HOLES))]
        alone = [engine.submit(p, s, o).result(120).text
                 for (p, s), o in zip(HOLES, options, strict=True)]
        requests = [engine.submit(p, s, o) for (p, s), o in zip(HOLES, options, strict=True)]
        together = [r.result(120).text for r in requests]
    finally:
        engine.close()
    assert sum(a == b for a, b in zip(alone, together, strict=True)) >= len(HOLES) - 1
    assert any(key.kind == "packed" for key in steps._shapes)
    assert steps.replays > replays


def test_the_engine_packs_its_steps_on_cuda_and_gives_the_texts_of_one_by_one(bundled_pair):
    """The bundled model in fp32: holes at different steps and of different lengths share
    packed steps; their greedy texts are those of each alone (near-ties may flip a rare
    token, so all but one must match)."""
    from model.decoding import packed_step

    _, gpu = bundled_pair
    sizes: list[int] = []
    original = packed_step.packed_pass
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed_step, "packed_pass",
                      lambda model, windows, fused=False: sizes.append(len(windows))
                      or original(model, windows, fused))
        engine = Engine(gpu, max_batch=8)
        try:
            alone = [engine.submit(p, s, InfillOptions(max_tokens=8 + 4 * i, min_tokens=1))
                     .result(120).text for i, (p, s) in enumerate(HOLES)]
            requests = [engine.submit(p, s, InfillOptions(max_tokens=8 + 4 * i, min_tokens=1))
                        for i, (p, s) in enumerate(HOLES)]
            together = [r.result(120).text for r in requests]
        finally:
            engine.close()
    assert sum(a == b for a, b in zip(alone, together, strict=True)) >= len(HOLES) - 1
    assert max(sizes) >= 3


async def test_the_language_server_completes_on_cuda(tmp_path):
    from benchmarks.lsp_client import inline, open_document, running_server, stats

    settings = {"model": {"device": "cuda", "dtype": "float32"},
                "completion": {"debounceMs": 0}}
    async with running_server(settings) as client:
        source = "def add(a, b):\n    return \n"
        uri = (tmp_path / "add.py").as_uri()
        open_document(client, uri, source)
        answer = await inline(client, uri, 1, 11)
        assert answer is not None and len(answer.items) == 1
        snapshot = await stats(client)
    assert snapshot["state"] == "ready"
    assert "cuda" in json.dumps(snapshot)


def test_the_compiled_layer_is_the_eager_layer_on_a_published_shape():
    """torch.compile'd decoder layers (on for networks of 200M parameters and more) inside
    the CUDA graph give what the eager layer loop gives, on Qwen2.5-0.5B's shape in bf16."""
    from model.network.shapes import random_model_of_shape

    model = random_model_of_shape("qwen2.5-0.5b", "cuda")
    layers = fast_step.layers_of(model.network)
    assert layers.compiled
    state = new_state(model, PREFIX * 8, SUFFIX, InfillOptions(initial_tokens=32,
                                                               refresh_every=0))
    forward_holes(model, [state])
    start, end = window(state, True)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    compiled = fast_step.HoleSteps(model).run(*args).clone()
    assert layers.compiled  # the compile went through (a failure falls back, and says so)
    compiled_function, layers.function = layers.function, fast_step.decoder_layer
    try:
        eager = fast_step.HoleSteps(model, graphs=False).run(*args)
    finally:
        layers.function = compiled_function
    assert relative_error(compiled, eager) < 2e-2


def switched(monkeypatch, env: dict[str, str]) -> None:
    for variable in fast_step.SWITCH_ENVS.values():
        monkeypatch.setenv(variable, env.get(variable, "0"))


def completions(model, options: InfillOptions) -> list:
    """Each hole filled twice in its own document (the second reuses the first's context: a
    partial pass), and once more without the document cache."""
    cache = PromptCache()
    done = []
    for index, (prefix, suffix) in enumerate(HOLES):
        for text in (prefix, prefix + "x"):
            done.append(infill(model, text, suffix, options, cache=cache, document=f"{index}"))
        done.append(infill(model, prefix, suffix, options))
    return done


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_gives_the_same_completions_on_cuda(switch, monkeypatch):
    """The bundled model (fp32, greedy) completes the holes with the same text, steps and
    passes with a switch on as with every switch off (all but one), full, partial and
    hole-only passes included; and the switch did run (scored steps, fused weights,
    captured passes)."""
    gpu = load_model(None, device="cuda", dtype="float32")  # its own: fusing changes it
    options = [InfillOptions(max_tokens=24, min_tokens=1),
               InfillOptions(max_tokens=32, initial_tokens=32, tokens_per_step=4,
                             single_line=True, min_tokens=2)]
    switched(monkeypatch, {})
    plain = [r for o in options for r in completions(gpu, o)]
    switched(monkeypatch, SWITCHES[switch])
    fast_step.layers_of(gpu.network).steps = None
    on = [r for o in options for r in completions(gpu, o)]
    # other kernels (an n-row head, padded passes, one q/k/v product) may round a last bit
    # apart and flip a rare near-tie: all but one completion the same, as on CUDA vs the CPU
    same = sum((a.text, a.steps, a.full_passes, a.reused_tokens)
               == (b.text, b.steps, b.full_passes, b.reused_tokens)
               for a, b in zip(on, plain, strict=True))
    assert same >= len(plain) - 1, (same, len(plain))
    steps = fast_step.hole_steps(gpu)
    kinds = {(key.kind, key.fused, key.head is not None) for key in steps._shapes}
    on_switches = fast_step.switches(gpu)
    assert on_switches.graph_head == any(head for _, _, head in kinds)
    assert on_switches.fused_projections == any(fused for _, fused, _ in kinds)
    assert on_switches.graph_passes == any(kind == "pass" for kind, _, _ in kinds)
    assert steps.captures >= len(kinds) and steps.replays > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_the_graph_head_scores_as_the_eager_step_on_cuda(family_dirs, name, dtype, monkeypatch):
    """A captured step's graph head gives, at the masked positions, the tokens and
    confidences `apply_step` computes from the same step's logits on the GPU."""
    from model.decoding.scoring import ban_early_ends, sample_and_score, sampleable, step_head

    model = load_model(family_dirs[name], device="cuda", dtype=dtype)
    options = InfillOptions(initial_tokens=12, refresh_every=0, min_tokens=4)
    state = new_state(model, PREFIX, SUFFIX, options)
    forward_holes(model, [state])
    state.hole[2], state.masked[2] = 5, False
    start, end = window(state, model.family.shifted_logits)
    head, bans = step_head(model, state)
    steps = fast_step.HoleSteps(model)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    for _ in range(2):  # the capture, then a replay
        scores = steps.run(*args, head=head, bans=bans).cpu()
        hidden = fast_step.HoleSteps(model, graphs=False).run(*args)
        masked = state.masked.nonzero().squeeze(-1)
        with torch.inference_mode():  # `hidden` is an inference tensor
            logits = model.network.lm_head(hidden[: head.rows]).float()[masked.cuda()]
            logits = ban_early_ends(model, sampleable(model, state, logits), masked, options)
            tokens, raw = sample_and_score(logits, "confidence", 0.0, None)
        agree = (scores[0, masked].long() == tokens.cpu()).float().mean()
        assert agree >= (1.0 if dtype == "float32" else 0.9)  # bf16: near-ties may flip
        assert relative_error(scores[1, masked], raw) < (1e-4 if dtype == "float32" else 2e-2)
        assert not set(scores[0, :4].long().tolist()) & model.ids.ends  # banned early
    assert steps.captures == 1 and steps.replays == 1


def test_fused_projections_and_captured_passes_on_a_published_shape():
    """On Qwen2.5-0.5B's shape in bf16, torch.compile'd: the fused projections hold no
    second copy of the weights and give the unfused hole step's hidden states; a captured
    full pass gives the uncaptured one's."""
    from model.network.shapes import random_model_of_shape

    model = random_model_of_shape("qwen2.5-0.5b", "cuda")
    state = new_state(model, PREFIX * 8, SUFFIX, InfillOptions(initial_tokens=32,
                                                               refresh_every=0))
    forward_holes(model, [state])
    start, end = window(state, True)
    args = (state.context.layers, state.context, state.sequence()[start:end], start)
    steps = fast_step.HoleSteps(model)
    unfused = steps.run(*args).clone()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    fused = steps.run(*args, fused=True).clone()
    layers = fast_step.layers_of(model.network)
    assert layers.fused_weights is not None
    weights = sum(p.numel() * p.element_size() for p in model.network.parameters())
    assert torch.cuda.memory_allocated() - allocated < weights // 20  # graphs, not weights
    # bf16 over 24 layers: other kernels round apart (a captured pass vs a plain one on this
    # shape differs by 1.45e-2 on a CPU, 7e-7 in fp32)
    assert relative_error(fused, unfused) < 5e-2
    sequence = state.sequence()
    positions = torch.arange(sequence.numel())
    plain, _ = fast_step.rows_pass(model, sequence, positions)
    plain = plain.clone()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(fast_step.GRAPH_PASSES_ENV, "1")
        for _ in range(2):  # the capture, then a replay
            captured, _ = fast_step.rows_pass(model, sequence, positions)
            assert relative_error(captured, plain) < 5e-2
    assert any(key.kind == "pass" for key in fast_step.hole_steps(model)._shapes)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weights_agree_with_bf16_on_cuda(scheme, tmp_path, monkeypatch):
    """The bundled model (trained weights) in int8 / int4 on CUDA (torchao's kernels) against
    bf16: close hidden states, nearly the same greedy completions (int8: all but one of
    HOLES), through the default CUDA path (the fast step, its graphs, the compiled layer)."""
    from model.network import quantize, quantized_cache

    monkeypatch.setenv(quantized_cache.CACHE_ENV, str(tmp_path))
    plain = load_model(None, device="cuda", dtype="bfloat16", quantization="none")
    model = load_model(None, device="cuda", quantization=scheme)
    assert model.quantization == scheme, model.quantization_notice
    assert quantize.is_quantized(model.network.model.layers[0].mlp.up_proj.weight)
    ids = torch.tensor([plain.tokenizer.encode(PREFIX + SUFFIX).ids], device="cuda")
    with torch.inference_mode():
        want = plain.network.model(input_ids=ids).last_hidden_state.float()
        got = model.network.model(input_ids=ids).last_hidden_state.float()
    assert relative_error(got, want) < (0.05 if scheme == "int8" else 0.25)
    options = InfillOptions(max_tokens=16, single_line=True, min_tokens=1)
    same = [infill(model, p, s, options).text == infill(plain, p, s, options).text
            for p, s in HOLES]
    assert sum(same) >= len(HOLES) - (1 if scheme == "int8" else 3), same
    reloaded = load_model(None, device="cuda", quantization=scheme)  # from the disk cache
    assert infill(reloaded, *HOLES[0], options).text == infill(model, *HOLES[0], options).text


def test_a_7b_shape_in_int4_fits_in_a_fraction_of_its_bf16_memory():
    """Built layer by layer in int4, Qwen2.5-7B's shape stays well under its bf16 size."""
    from model.network.shapes import random_model_of_shape

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = random_model_of_shape("qwen2.5-7b", "cuda", quantization="int4")
    assert model.quantization == "int4"
    assert torch.cuda.max_memory_allocated() < 8 * 2**30
    result = infill(model, PREFIX, SUFFIX, InfillOptions(max_tokens=16, tokens_per_step=8))
    assert result.steps >= 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_block_steps_are_the_uncaptured_ones_on_cuda(tmp_path, dtype):
    """Stable-DiffCoder's block forwards (model/decoding/fast_step/block_step.py): captured
    (DIFFUSION_LSP_BLOCK_GRAPHS) against uncaptured and against transformers, for a block's
    denoising forwards (a capture, then replays), its write and the next block's forward."""
    from model.decoding.block import BlockCache, run_rows

    from .fixtures_block import write_stable_diffcoder

    model = load_model(write_stable_diffcoder(tmp_path / "m"), device="cuda", dtype=dtype)
    assert fast_step.enabled(model)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    steps = fast_step.BlockSteps(model)
    ids = torch.randint(10, 300, (30,), generator=torch.Generator().manual_seed(0))

    def check(cache: BlockCache, new: torch.Tensor) -> list:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(fast_step.DISABLE_ENV, "0")
            want, want_layers = run_rows(model, cache, new, 4)
        eager, _ = fast_step.block_rows(model, cache.layers, cache.length, new, 4)
        got, layers = steps.run(cache.layers, cache.length, new, 4)
        assert relative_error(got, want) < tolerance and relative_error(got, eager) < tolerance
        assert relative_error(layers[-1][0], want_layers[-1][0]) < tolerance
        return layers

    _, prompt = fast_step.block_rows(model, [], 0, ids[:18], 4)
    cache = BlockCache(prompt, 18)
    check(cache, ids[18:20])  # a block's denoising forward: captured
    written = BlockCache(check(cache, ids[18:20]), 20)  # replayed, and kept as the write
    for _ in range(2):  # the next block against the written cache: captured, replayed
        check(written, ids[20:24])
    assert steps.captures == 2 and steps.replays == 2


def test_block_graphs_give_the_same_completions_on_cuda(tmp_path, monkeypatch):
    """Whole FIM completions of the tiny Stable-DiffCoder (fp32) with the block forwards
    captured and not: the same texts and steps, and the graphs replayed."""
    from .fixtures_block import write_stable_diffcoder

    model = load_model(write_stable_diffcoder(tmp_path / "m", eos_boost=3.0), device="cuda",
                       dtype="float32")
    options = InfillOptions(max_tokens=16, threshold=0.95)

    def texts() -> list:
        return [(r.text, r.steps) for r in (infill(model, p, s, options) for p, s in HOLES)]

    monkeypatch.setenv(fast_step.BLOCK_GRAPHS_ENV, "0")
    plain = texts()
    monkeypatch.setenv(fast_step.BLOCK_GRAPHS_ENV, "1")
    assert texts() == plain
    assert fast_step.block_steps(model).replays > 0
