"""8- and 4-bit weights (model/network/quantize.py): the choice, the streamed load, the disk cache,
and every path of the sampler on a quantized network."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from diffusion_contract.options import InfillOptions
from diffusion_lsp.cli import main
from lsp_server.settings import Settings, merge
from model.decoding import fast_step
from model.decoding.multi_hole import infill_holes
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import infill
from model.network import quantize, quantized_cache
from model.network.loader import WeightIndex, bundled_model_path, load_model, quantized_copy
from model.network.published import FAMILY_SPECS, write_checkpoint

from .helpers import as_on_cuda, hole_pass_both_ways

pytest.importorskip("torchao")

PREFIX = "def add(a, b):\n    total = a + b\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
CPU = torch.device("cpu")
BUNDLED_PROMPTS = [  # (prefix, suffix) pairs the bundled model completes with real code
    ("def add(a, b):\n    return ", "\n"),
    ("for i in range(10):\n    ", "\n"),
    ("import os\n\npath = os.path.", "\n"),
    ("def is_even(n):\n    return n % 2 == ", "\n"),
    ("numbers = [1, 2, 3]\ntotal = sum(", ")\n"),
    ("class Point:\n    def __init__(self, x, y):\n        self.x = ", "\n"),
]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(quantized_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quantized-families")
    return {name: write_checkpoint(root / name, name) for name in FAMILY_SPECS}


# -- the choice ---------------------------------------------------------------------------------


def test_an_unknown_choice_is_refused_naming_the_valid_ones():
    with pytest.raises(quantize.QuantizationError, match="int3.*none, int8, int4, auto"):
        quantize.check_choice("int3")
    with pytest.raises(Exception, match="none, int8, int4, auto"):
        load_model(None, device="cpu", quantization="int3")


@pytest.mark.parametrize("command", [["infill", "--input", "x", "--output", "y"], ["demo"],
                                     ["serve"], ["bench", "latency"], ["service"], ["doctor"]])
def test_the_flag_refuses_int3_at_once(command, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--quantization", "int3"])
    assert stopped.value.code != 0
    said = capsys.readouterr().err
    assert "int3" in said and all(f"'{name}'" in said for name in quantize.CHOICES)


def test_the_setting_reports_a_bad_value_once_and_keeps_the_previous():
    settings, problems = merge(Settings(), {"model": {"quantization": "int8"}})
    assert problems == [] and settings.model.quantization == "int8"
    kept, problems = merge(settings, {"model": {"quantization": "int3"}})
    assert kept.model.quantization == "int8"
    assert len(problems) == 1 and "none, int8, int4, auto" in problems[0]


def test_a_scheme_without_a_kernel_falls_back_to_the_nearest_saying_so(monkeypatch):
    monkeypatch.setitem(quantize.KERNELS, ("cpu", quantize.INT4), None)
    monkeypatch.setattr(quantize, "kernel_for", lambda scheme, device: quantize.KERNELS.get(
        (device.type, scheme)) if scheme != quantize.NONE else None)
    plan = quantize.nearest_working(quantize.INT4, CPU)
    assert plan.scheme == quantize.INT8 and "int4" in plan.notice and "int8" in plan.notice
    monkeypatch.setattr(quantize, "torchao_version", lambda: None)
    monkeypatch.setattr(quantize, "kernel_for", lambda scheme, device: None)
    plan = quantize.nearest_working(quantize.INT8, CPU)
    assert plan.scheme == quantize.NONE and "torchao is not installed" in plan.notice


def test_a_fallback_is_said_once_in_the_log_and_the_model_says_what_it_runs(
        family_dirs, monkeypatch, caplog):
    monkeypatch.setitem(quantize.KERNELS, ("cpu", quantize.INT4), None)
    original = quantize.kernel_for
    monkeypatch.setattr(quantize, "kernel_for", lambda scheme, device: None
                        if scheme == quantize.INT4 else original(scheme, device))
    with caplog.at_level(logging.WARNING, logger="model.network.loader"):
        model = load_model(family_dirs["dream"], device="cpu", quantization="int4")
    assert model.quantization == quantize.INT8
    assert [r.message for r in caplog.records].count(model.quantization_notice) == 1


def test_auto_on_cuda_takes_the_largest_that_fits_with_room_for_caches():
    cuda = torch.device("cuda")
    seven_b, linears = 7_600_000_000, 6_500_000_000
    kernel = quantize.KERNELS[("cuda", quantize.INT8)]
    if quantize.torchao_version() is None:
        pytest.skip("torchao is not installed")
    assert kernel is not None
    gib = 2**30
    assert quantize.choose_auto(cuda, seven_b, linears, 80 * gib).scheme == quantize.NONE
    assert quantize.choose_auto(cuda, seven_b, linears, 12 * gib).scheme == quantize.INT8
    assert quantize.choose_auto(cuda, seven_b, linears, 8 * gib).scheme == quantize.INT4
    with pytest.raises(quantize.QuantizationError, match="does not fit.*int4"):
        quantize.choose_auto(cuda, seven_b, linears, 2 * gib)


def test_auto_on_a_cpu_is_int8_where_fbgemm_was_measured_faster(monkeypatch):
    """On a CPU without native bf16, fbgemm's int8 took about half of float32's time for the
    0.5B shape (docs/benchmarks.md): auto takes it for networks that size, not for small ones,
    and not where bf16 is native (measured there: the bf16 network) or fbgemm is missing."""
    from model.catalog import cpu

    small, large = (10_000_000, 8_000_000), (494_000_000, 358_000_000)
    monkeypatch.setattr(cpu, "has_native_bf16", lambda flags=None: False)
    monkeypatch.setattr(quantize, "fbgemm_available", lambda: True)
    assert quantize.choose_auto(CPU, *small).scheme == quantize.NONE
    plan = quantize.choose_auto(CPU, *large)
    assert plan.scheme == quantize.INT8 and plan.kernel.config == quantize.FBGEMM_INT8
    assert "quantization auto: int8" in plan.notice
    monkeypatch.setattr(cpu, "has_native_bf16", lambda flags=None: True)
    assert quantize.choose_auto(CPU, *large).scheme == quantize.NONE
    monkeypatch.setattr(cpu, "has_native_bf16", lambda flags=None: False)
    monkeypatch.setattr(quantize, "fbgemm_available", lambda: False)
    assert quantize.choose_auto(CPU, *large).scheme == quantize.NONE


# -- loading --------------------------------------------------------------------------------------


def quantized_linears(model) -> set[type]:
    return {type(linear.weight) for layer in model.network.model.layers
            for _, linear in quantize.quantizable(layer)}


@pytest.mark.parametrize("scheme", [quantize.INT8, quantize.INT4])
@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_every_family_loads_quantized_and_completes(family_dirs, name, scheme):
    plain = load_model(family_dirs[name], device="cpu", quantization="none")
    model = load_model(family_dirs[name], device="cpu", quantization=scheme)
    kernel = quantize.kernel_for(scheme, torch.device("cpu"))
    assert model.quantization == scheme and model.dtype == kernel.dtype
    assert all(quantize.is_quantized(t) for t in quantized_linears(model)) or \
        all(t is not torch.nn.Parameter for t in quantized_linears(model))
    # the head in bits only where the kernel says so, and then untied from the embedding
    assert quantize.is_quantized(model.network.lm_head.weight) == kernel.head
    assert not quantize.is_quantized(model.network.model.embed_tokens.weight)
    options = InfillOptions(max_tokens=8, initial_tokens=8, tokens_per_step=2)
    got, want = infill(model, PREFIX, SUFFIX, options), infill(plain, PREFIX, SUFFIX, options)
    assert got.steps == want.steps and "<|" not in got.text


def test_the_quantized_network_computes_close_to_the_plain_one(family_dirs):
    plain = load_model(family_dirs["dream"], device="cpu", quantization="none")
    ids = torch.tensor([plain.tokenizer.encode(PREFIX + SUFFIX).ids])
    with torch.inference_mode():
        want = plain.network.model(input_ids=ids).last_hidden_state
        for scheme, tolerance in ((quantize.INT8, 0.05), (quantize.INT4, 0.3)):
            model = load_model(family_dirs["dream"], device="cpu", quantization=scheme)
            got = model.network.model(input_ids=ids).last_hidden_state.float()
            assert float((got - want).norm() / want.norm()) < tolerance


@pytest.mark.skipif(bundled_model_path() is None, reason="no bundled model")
def test_int8_completes_as_the_bundled_model_does():
    """Trained weights: int8 greedy completions are the unquantized ones for all but at most
    one of the prompts (docs/models.md measures the rate over HumanEval)."""
    plain = load_model(None, device="cpu", quantization="none")
    model = load_model(None, device="cpu", quantization="int8")
    options = InfillOptions(max_tokens=16, single_line=True, min_tokens=1)
    same = [infill(model, p, s, options).text == infill(plain, p, s, options).text
            for p, s in BUNDLED_PROMPTS]
    assert sum(same) >= len(same) - 1
    assert infill(model, *BUNDLED_PROMPTS[0], options).text.strip()


def test_the_streamed_load_holds_one_layer_at_a_time(family_dirs, monkeypatch):
    """Tensors are read a group at a time -- the embedding, norm and head (quantized at once
    where the kernel quantizes it), then one decoder layer -- and each layer is quantized
    before the next is read."""
    events = []
    read, quantize_module = WeightIndex.read, quantize.quantize_module
    monkeypatch.setattr(WeightIndex, "read", lambda self, names: (
        events.append(("read", sorted({n.split(".")[2] if n.startswith("model.layers.")
                                        else "rest" for n in names}))), read(self, names))[1])
    monkeypatch.setattr(quantize, "quantize_module", lambda module, kernel: (
        events.append(("quantize",)), quantize_module(module, kernel))[1])
    load_model(family_dirs["llada"], device="cpu", quantization="int8")
    head = [("quantize",)] if quantize.kernel_for("int8", torch.device("cpu")).head else []
    assert events == [("read", ["rest"]), *head, ("read", ["0"]), ("quantize",),
                      ("read", ["1"]), ("quantize",)]


# -- the disk cache -------------------------------------------------------------------------------


def count_quantizations(monkeypatch) -> list:
    calls = []
    original = quantize.quantize_module
    monkeypatch.setattr(quantize, "quantize_module",
                        lambda module, kernel: (calls.append(1), original(module, kernel))[1])
    return calls


def test_the_second_load_reads_the_kept_copy(family_dirs, monkeypatch, cache_dir):
    calls = count_quantizations(monkeypatch)
    first = load_model(family_dirs["dream"], device="cpu", quantization="int8")
    built = len(calls)
    second = load_model(family_dirs["dream"], device="cpu", quantization="int8")
    assert built > 0 and len(calls) == built  # nothing quantized the second time
    assert len(list(cache_dir.glob("quantized/*/weights.pt"))) == 1
    options = InfillOptions(max_tokens=8, initial_tokens=8, tokens_per_step=2)
    assert infill(second, PREFIX, SUFFIX, options).text == \
        infill(first, PREFIX, SUFFIX, options).text
    load_model(family_dirs["dream"], device="cpu", quantization="int4")  # another key
    assert len(list(cache_dir.glob("quantized/*/weights.pt"))) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_a_damaged_copy_is_rebuilt_never_served(family_dirs, monkeypatch, cache_dir, damage):
    first = load_model(family_dirs["dream"], device="cpu", quantization="int8")
    (weights,) = cache_dir.glob("quantized/*/weights.pt")
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 3]))
    else:
        manifest = weights.parent / quantized_cache.MANIFEST
        manifest.write_text(json.dumps({"key": "stale", "sha256": "0"}))
    calls = count_quantizations(monkeypatch)
    again = load_model(family_dirs["dream"], device="cpu", quantization="int8")
    assert calls  # rebuilt from the checkpoint
    options = InfillOptions(max_tokens=8, initial_tokens=8, tokens_per_step=2)
    assert infill(again, PREFIX, SUFFIX, options).text == \
        infill(first, PREFIX, SUFFIX, options).text
    calls.clear()
    load_model(family_dirs["dream"], device="cpu", quantization="int8")
    assert not calls  # and the rebuilt copy is whole


def test_a_changed_checkpoint_is_not_served_its_old_copy(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "dream", "dream", seed=0)
    load_model(path, device="cpu", quantization="int8")
    write_checkpoint(tmp_path / "dream", "dream", seed=1)  # new weights, same place
    calls = count_quantizations(monkeypatch)
    load_model(path, device="cpu", quantization="int8")
    assert calls


# -- every path on a quantized network ------------------------------------------------------------


def completions(model) -> list:
    options = [InfillOptions(max_tokens=12, initial_tokens=12, tokens_per_step=2),
               InfillOptions(max_tokens=12, initial_tokens=8, min_tokens=3, refresh_every=3,
                             single_line=True),
               InfillOptions(max_tokens=8, initial_tokens=8, tokens_per_step=2,
                             reuse_context=False)]
    cache = PromptCache()
    return [infill(model, PREFIX + extra, SUFFIX, o, cache=cache, document="a.py")
            for o in options for extra in ("", "x")]


@pytest.mark.parametrize("scheme", [quantize.INT8, quantize.INT4])
def test_the_fast_step_reads_the_quantized_weights(family_dirs, monkeypatch, scheme, caplog):
    """The fast step's own layer loop computes a hole step's hidden states from the
    quantized weights as transformers' modules do (bf16: up to its rounding); plain passes,
    the document cache and hole-only steps run through it with each switch (as on CUDA) with
    the same passes and reuse (the texts of random weights may flip on bf16 near-ties).
    Fused projections are refused for quantized weights, said once."""
    from model.decoding.sampler import new_state

    model = load_model(family_dirs["dream"], device="cpu", quantization=scheme)
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(initial_tokens=12, refresh_every=0))
    from model.decoding.passes import forward_holes

    forward_holes(model, [state])
    reference, looped = hole_pass_both_ways(model, state)
    assert float((looped.float() - reference.float()).norm() / reference.float().norm()) < 2e-2
    plain = completions(model)
    for env in ({}, {fast_step.GRAPH_HEAD_ENV: "1"}, {fast_step.GRAPH_PASSES_ENV: "1"},
                {fast_step.FUSED_PROJECTIONS_ENV: "1"}):
        as_on_cuda(monkeypatch, model, env)
        with caplog.at_level(logging.WARNING, logger="model.decoding.fast_step"):
            looped = completions(model)
        for a, b in zip(plain, looped, strict=True):
            assert (b.steps, b.full_passes, b.reused_tokens) == \
                (a.steps, a.full_passes, a.reused_tokens)
    assert fast_step.layers_of(model.network).fused_weights is None
    assert sum("not fused" in r.message for r in caplog.records) <= 1
    with pytest.raises(ValueError, match="cannot be fused"):
        fast_step.layers_of(model.network).fuse()


def test_several_holes_and_next_edits_run_on_a_quantized_network(family_dirs):
    import asyncio

    from model.decoding.next_edit import Hole, Site, rewrite

    model = load_model(family_dirs["dream"], device="cpu", quantization="int8")
    result = infill_holes(model, ["def f(a, b):\n    return ", " + ", "\n"],
                          InfillOptions(max_tokens=4, initial_tokens=4, tokens_per_step=2))
    assert len(result.texts) == 2 and result.steps >= 1

    async def fill(prefix: str, suffix: str, hole: Hole) -> tuple[str, int]:
        done = infill(model, prefix, suffix, InfillOptions(max_tokens=hole.max_tokens,
                                                           initial_tokens=2, min_tokens=1))
        return done.text, done.steps

    region = "def area(width, height):\n    return width * height\n"
    count = lambda text: len(model.tokenizer.encode(text).ids)  # noqa: E731
    new, steps = asyncio.run(rewrite(Site("", region, 0, "\n"), "region", count, fill))
    assert steps >= 1 and new is not None


def test_a_batch_of_holes_on_the_engine_runs_quantized(family_dirs):
    from model.engine import Engine

    model = load_model(family_dirs["dream"], device="cpu", quantization="int4")
    engine = Engine.start(lambda: model, warm_up=False).result()
    try:
        import asyncio

        async def both():
            options = InfillOptions(max_tokens=6, initial_tokens=6, tokens_per_step=2)
            return await asyncio.gather(engine.infill(PREFIX, SUFFIX, options),
                                        engine.infill(PREFIX + "x", SUFFIX, options))

        results = asyncio.run(both())
        assert all(r.steps >= 1 for r in results)
    finally:
        engine.close()


def test_a_quantized_copy_is_what_loading_quantized_gives(family_dirs):
    plain = load_model(family_dirs["open-dcoder"], device="cpu", quantization="none")
    loaded = load_model(family_dirs["open-dcoder"], device="cpu", quantization="int8")
    copied = quantized_copy(plain, "int8")
    ids = torch.tensor([plain.tokenizer.encode(PREFIX).ids])
    with torch.inference_mode():
        torch.testing.assert_close(copied.network(input_ids=ids).logits,
                                   loaded.network(input_ids=ids).logits)
    assert quantized_copy(plain, "none") is plain


def test_int8_on_a_cpu_needs_only_torch(monkeypatch, family_dirs):
    """torchao is needed for int4 and for CUDA; a CPU's int8 is torch's own kernel."""
    monkeypatch.setattr(quantize, "torchao_version", lambda: None)
    assert quantize.nearest_working(quantize.INT8, CPU).scheme == quantize.INT8
    plan = quantize.nearest_working(quantize.INT4, CPU)
    assert plan.scheme == quantize.INT8 and "torchao is not installed" in plan.notice
    assert quantize.nearest_working(quantize.INT8, torch.device("cuda")).scheme == quantize.NONE


def test_cpu_int8_is_fbgemms_dynamic_kernel_where_torch_has_it(monkeypatch):
    """x86: fbgemm's dynamic int8 linear, head included; elsewhere aten's weight-only one."""
    if quantize.fbgemm_available():
        kernel = quantize.kernel_for(quantize.INT8, CPU)
        assert kernel.config == quantize.FBGEMM_INT8 and kernel.head
        assert kernel.dtype == torch.float32
    monkeypatch.setattr(quantize, "fbgemm_available", lambda: False)
    assert quantize.kernel_for(quantize.INT8, CPU) is quantize.CPU_INT8_WEIGHT_ONLY


@pytest.mark.skipif(not quantize.fbgemm_available(),
                    reason="torch's quantized engine is not fbgemm")
def test_the_dynamic_int8_weight_computes_a_linear_and_saves_without_its_packing(tmp_path):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator) * 0.05
    x = torch.randn(5, 3, 64, generator=generator)
    bias = torch.randn(96, generator=generator)
    quantized = quantize.Int8DynamicWeight.quantize(weight)
    want = torch.nn.functional.linear(x, weight, bias)
    got = torch.nn.functional.linear(x, quantized, bias)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 0.02  # int8 weights and activations
    assert "_packed" in quantized.__dict__  # packed for fbgemm on first use ...
    torch.save({"w": quantized}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=False)["w"]
    assert type(loaded) is quantize.Int8DynamicWeight and "_packed" not in loaded.__dict__
    torch.testing.assert_close(torch.nn.functional.linear(x, loaded, bias), got)  # ... not saved
    half = torch.nn.functional.linear(x.to(torch.bfloat16), quantized)
    assert half.dtype == torch.bfloat16  # activations in another dtype come back in it


@pytest.mark.skipif(not quantize.fbgemm_available(),
                    reason="torch's quantized engine is not fbgemm")
def test_a_row_of_massive_activations_does_not_flatten_the_others():
    """A first token's activations hundreds of times larger than the rest (as trained
    transformers have) get their own activation scale: every row stays within int8's error."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(128, 96, generator=generator) * 0.05
    x = torch.randn(12, 96, generator=generator)
    x[0] *= 300
    x[4] *= 20
    want = torch.nn.functional.linear(x, weight)
    got = torch.nn.functional.linear(x, quantize.Int8DynamicWeight.quantize(weight))
    error = (got - want).norm(dim=1) / want.norm(dim=1)
    assert float(error.max()) < 0.05, error
    assert len(quantize.magnitude_groups(x)) == 3
    assert len(quantize.magnitude_groups(torch.randn(12, 96, generator=generator))) == 1


def test_doctor_shows_what_auto_loads_with_its_memory():
    from types import SimpleNamespace

    from lsp_server.doctor import SEVEN_B, quantization_choices

    def on(gib: float) -> dict:
        machine = SimpleNamespace(gpus=[object()], gpu_memory_gib=gib)
        return quantization_choices(machine, [SEVEN_B])[0]

    assert on(80)["quantization"] == "none"
    assert on(12) == {"model": SEVEN_B, "quantization": "int8", "size_gb": 8.7} or \
        on(12)["quantization"] == "int4"
    assert on(8)["quantization"] == "int4" and on(8)["size_gb"] < 6
    assert on(3)["quantization"] is None and "does not fit" in on(3)["why"]


def test_models_lists_each_models_size_at_8_and_4_bits(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    seven = rows["Dream-Coder-v0-Instruct-7B"]
    assert seven["size_gb_int4"] < seven["size_gb_int8"] < 15.2
    assert rows["Open-dCoder-0.5B"]["size_gb_int8"] < 1.0


def test_only_the_most_recently_used_copies_are_kept(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(quantized_cache, "KEPT", 2)
    paths = [write_checkpoint(tmp_path / f"m{i}", "dream", seed=i) for i in range(3)]
    for path in paths:
        load_model(path, device="cpu", quantization="int8")
    assert len(list(cache_dir.glob("quantized/*/weights.pt"))) == 2


@pytest.mark.parametrize("name", ["open-dcoder", "dream"])  # head tied / untied
def test_the_estimated_size_is_what_the_quantized_network_occupies(family_dirs, name):
    """The size doctor and models show (model.catalog.registry.weights_bytes through
    quantize.weight_bytes) is the bytes the loaded network's weights hold, per scheme: on a
    CPU int8 runs in float32 around an int8 head (a copy of its own where tied)."""
    plain = load_model(family_dirs[name], device="cpu", quantization="none").network
    parameters = sum(p.numel() for p in plain.parameters())
    for scheme in ("none", "int8", "int4"):
        network = load_model(family_dirs[name], device="cpu", quantization=scheme).network
        held = sum(quantize.stored_bytes(p) for p in network.parameters())
        estimate = quantize.weight_bytes(
            parameters, quantize.linear_parameter_count(plain), scheme,
            plain.lm_head.weight.element_size(), quantize.kernel_for(scheme, CPU),
            plain.lm_head.weight.numel(), plain.config.tie_word_embeddings)
        # int8's scale per row is 4 bytes per 32 weights in these narrow checkpoints
        assert estimate == pytest.approx(held, rel=0.05), (scheme, estimate, held)


def test_the_registry_shares_are_the_shapes_own():
    """linear_share / head_share / tied of the sizes' formula, against the published shapes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from model.catalog.registry import find_supported
    from model.network.shapes import SHAPES

    for name, shape in (("Open-dCoder-0.5B", "qwen2.5-0.5b"), ("Dream-Coder-v0-Base-7B",
                                                                "qwen2.5-7b")):
        with torch.device("meta"):
            network = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape]))
        known = find_supported(name)
        parameters = sum(p.numel() for p in network.parameters())
        assert known.tied == network.config.tie_word_embeddings
        assert quantize.linear_parameter_count(network) / parameters == \
            pytest.approx(known.linear_share, abs=0.01)
        assert network.lm_head.weight.numel() / parameters == \
            pytest.approx(known.head_share, abs=0.005)


def test_doctor_on_a_cpu_shows_int8_in_float32_around_an_int8_head():
    from types import SimpleNamespace

    from lsp_server.doctor import quantization_choices

    cpu = SimpleNamespace(gpus=[], gpu_memory_gib=0)
    if quantize.kernel_for("int8", CPU) is not quantize.KERNELS[("cpu", "int8")]:
        pytest.skip("fbgemm is not torch's quantized engine here")
    row = quantization_choices(cpu, ["Open-dCoder-0.5B"], "int8")[0]
    # measured: a random-weight Qwen2.5-0.5B loaded in int8 on this CPU holds 1.04 GB
    assert row["quantization"] == "int8" and 0.95 <= row["size_gb"] <= 1.15, row


@pytest.mark.parametrize("native_bf16", [False, True])
def test_int4_on_a_cpu_without_native_bf16_says_it_saves_memory_not_time(monkeypatch,
                                                                          native_bf16):
    from model.catalog import cpu

    monkeypatch.setattr(cpu, "has_native_bf16", lambda flags=None: native_bf16)
    plan = quantize.nearest_working("int4", CPU)
    assert plan.scheme == "int4"
    assert (plan.notice is not None and "memory, not time" in plan.notice) != native_bf16
    assert quantize.nearest_working("int8", CPU).notice is None
