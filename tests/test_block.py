"""Block diffusion (Stable-DiffCoder): a tiny checkpoint in the published format, loaded by the
project's loader, against the published sampler (`tests.stable_diffcoder_reference`): the same
logits under the block-causal mask, the same ids and forward count in exact mode, and FIM
infilling on the sampler core with an exact cache across keystrokes."""

from __future__ import annotations

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding.block import WRITE_CHUNK, BlockCache, block_causal_mask, run_rows
from model.decoding.hole import layout_ids
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import generate_exact, infill, new_state
from model.network.loader import load_model

from .fixtures_block import (
    EOS,
    MASK,
    generate_block_both,
    official_model,
    write_stable_diffcoder,
)
from .helpers import one_thread  # noqa: F401 - autouse: tiny matmuls on one thread

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
# (eos row scale, scale of every output row): plain random, ends often, sharp (the threshold
# commits several positions a step) and both
VARIANTS = {"plain": (1.0, 1.0), "ends": (8.0, 1.0), "sharp": (1.0, 60.0),
            "sharp-ends": (6.0, 40.0)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stable-diffcoder")
    return {name: write_stable_diffcoder(root / name, eos_boost=boost)
            for name, (boost, _) in VARIANTS.items()}


def sharpened(network: torch.nn.Module, scale: float) -> None:
    with torch.no_grad():
        network.lm_head.weight *= scale


@pytest.fixture(scope="module")
def pairs(checkpoints) -> dict:
    """(ours, official) per variant, float32."""
    out = {}
    for name, path in checkpoints.items():
        ours, official = load_model(path, device="cpu", dtype="float32"), official_model(path)
        sharpened(ours.network, VARIANTS[name][1])
        sharpened(official, VARIANTS[name][1])
        out[name] = (ours, official)
    return out


def test_the_published_checkpoint_loads_as_stable_diffcoder(pairs):
    model, _ = pairs["plain"]
    assert model.family.name == "stable-diffcoder"
    assert type(model.network).__name__ == "LlamaForCausalLM"  # stock class, no remote code
    assert (model.ids.mask, model.ids.end_of_hole) == (MASK, EOS)
    assert model.family.block_length == 4 and not model.family.shifted_logits


def test_its_architecture_alone_names_the_family():
    """A Llama checkpoint saved by the published class is Stable-DiffCoder by its config,
    whatever its tokenizer holds; a plain Llama one without the mask token is not."""
    from model.network.families import STABLE_DIFFCODER, detect_family

    config = {"model_type": "llama", "architectures": ["StableDiffcoderForCausalLM"]}
    assert detect_family(config, []) is STABLE_DIFFCODER
    assert detect_family({"model_type": "llama"}, ["<[MASK_TOKEN]>"]) is STABLE_DIFFCODER
    with pytest.raises(ValueError, match="cannot tell the model family"):
        detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, [])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logits_match_the_published_class_under_the_block_causal_mask(checkpoints, pairs,
                                                                       attention):
    model, _ = pairs["plain"]
    official = official_model(checkpoints["plain"], attention)
    ids = torch.randint(10, 300, (1, 23), generator=torch.Generator().manual_seed(1))
    mask = block_causal_mask(0, 23, 4, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        expected = official(ids, attention_mask=mask).logits[0]
    hidden, _ = run_rows(model, BlockCache([]), ids[0], 4)
    with torch.inference_mode():
        ours = model.network.lm_head(hidden)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # and the mask matters: causal-across-blocks is not full attention
    with torch.no_grad():
        full = official(ids, attention_mask=torch.zeros(1, 1, 23, 23)).logits[0]
    assert not torch.allclose(full, expected, atol=1e-3)


def test_a_block_run_against_the_cache_matches_the_whole_sequence(pairs):
    """The exact cache: rows computed block by block equal the rows of one pass."""
    model, _ = pairs["plain"]
    ids = torch.randint(10, 300, (20,), generator=torch.Generator().manual_seed(2))
    whole, _ = run_rows(model, BlockCache([]), ids, 4)
    _, layers = run_rows(model, BlockCache([]), ids[:8], 4)
    part, _ = run_rows(model, BlockCache(layers, 8), ids[8:], 4)
    torch.testing.assert_close(part, whole[8:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("threshold", [None, 0.95])
@pytest.mark.parametrize("prompt_length", [1, 3, 4, 6, 9])
def test_exact_mode_is_generate_block_token_for_token_and_forward_for_forward(
        pairs, variant, threshold, prompt_length):
    """Block length 4, steps = length, fp32; prompts whose length is and is not a multiple of
    the block length; eos found or not."""
    ours, official = generate_block_both(*pairs[variant], prompt_length, threshold)
    assert ours == official


def test_exact_mode_covers_ends_and_several_commits(pairs):
    """The variants reach what they are there for (else the test above proves less)."""
    prompt = torch.randint(10, 300, (1, 6), generator=torch.Generator().manual_seed(6))
    ids, _ = generate_exact(pairs["ends"][0], prompt, gen_length=16, steps=16, eos_id=EOS)
    assert EOS in ids[0].tolist() and ids.shape[1] < 6 + 16
    _, gated = generate_exact(pairs["sharp-ends"][0], prompt[:, :4], gen_length=16, steps=16,
                              threshold=0.95, eos_id=EOS)
    _, counted = generate_exact(pairs["sharp-ends"][0], prompt[:, :4], gen_length=16, steps=16,
                                threshold=None, eos_id=EOS)
    assert gated < counted


def test_exact_mode_with_fewer_steps_and_no_eos(pairs):
    model, official = pairs["sharp"]
    prompt = torch.randint(10, 300, (1, 5), generator=torch.Generator().manual_seed(5))
    expected, expected_forwards = official.generate_block(
        prompt.clone(), steps=8, gen_length=16, block_length=4, threshold=None, eos_id=None)
    ids, forwards = generate_exact(model, prompt, gen_length=16, steps=8, threshold=None)
    assert (ids.tolist(), forwards) == (expected.tolist(), expected_forwards)


def test_generate_blocks_keywords_are_taken_as_they_are(pairs):
    """The reference's call, keyword for keyword (the card's usage), gives its answer."""
    model, official = pairs["ends"]
    prompt = torch.randint(10, 300, (1, 7), generator=torch.Generator().manual_seed(7))
    settings = {"steps": 16, "gen_length": 16, "block_length": 4, "temperature": 0.0,
                "remasking": "low_confidence", "mask_id": MASK, "threshold": None,
                "eos_id": EOS}
    expected = official.generate_block(prompt.clone(), **settings)
    got = generate_exact(model, prompt, tokenizer=model.tokenizer, shift=False, **settings)
    assert (got[0].tolist(), got[1]) == (expected[0].tolist(), expected[1])
    with pytest.raises(ValueError, match="shift"):
        generate_exact(model, prompt, shift=True, **settings)


def test_a_tokenizer_without_fim_tokens_loads_for_exact_mode(tmp_path):
    model = load_model(write_stable_diffcoder(tmp_path / "m", fim=False), device="cpu",
                       dtype="float32")
    assert model.family.name == "stable-diffcoder" and model.ids.fim is None
    ids, forwards = generate_exact(model, [11, 12, 13], gen_length=8, steps=8, eos_id=EOS)
    assert ids.shape[1] <= 3 + 8 and forwards > 0
    with pytest.raises(ValueError, match="FIM tokens"):
        infill(model, PREFIX, SUFFIX)


def test_fim_layout_is_suffix_first(pairs):
    model, _ = pairs["plain"]
    prefix_ids, suffix_ids = layout_ids(model, PREFIX, SUFFIX)
    fim = model.ids.fim
    encode = model.tokenizer.encode
    assert prefix_ids == [fim.suffix, *encode(SUFFIX, add_special_tokens=False).ids, fim.prefix,
                          *encode(PREFIX, add_special_tokens=False).ids, fim.middle]
    assert suffix_ids == []


def test_a_fim_hole_fills_block_by_block_and_ends_at_eos(pairs):
    model, _ = pairs["ends"]
    options = InfillOptions(max_tokens=24, threshold=0.95)
    state = new_state(model, PREFIX, SUFFIX, options)
    assert state.hole.numel() == 4 - state.hole_start % 4  # the first block completes the prompt's
    holes = []
    result = infill(model, PREFIX, SUFFIX, options,
                    on_step=lambda s: holes.append(s.hole.numel()))
    assert holes == sorted(holes)  # blocks fill left to right, the hole grows a block at a time
    assert result.finish_reason in ("end", "max_tokens")
    assert "<[" not in result.text


def long_document(lines: int) -> tuple[str, str]:
    body = "".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(lines))
    return body + "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n" + body


@pytest.mark.parametrize("variant", ["plain", "ends"])
def test_completions_with_and_without_the_prompt_cache_are_identical(pairs, variant):
    """Across keystrokes the unchanged start of the prompt is reused, exactly: each keystroke's
    completion is the one computed from scratch (unlike the full-canvas families)."""
    model, _ = pairs[variant]
    prefix, suffix = long_document(60)
    cache = PromptCache()
    options = InfillOptions(max_tokens=12, threshold=0.95)
    typed = ["", "a", "a +", "a + b"]
    reused = []
    for text in typed:
        cached = infill(model, prefix + text, suffix, options, cache=cache, document="doc")
        fresh = infill(model, prefix + text, suffix, options)
        assert cached.text == fresh.text
        assert [s.committed for s in cached.trace] == [s.committed for s in fresh.trace]
        reused.append(cached.reused_tokens)
    assert reused[0] == 0 and min(reused[1:]) >= WRITE_CHUNK


def test_a_block_family_runs_on_8_bit_weights(checkpoints):
    """Low-bit weights reach the block passes too: the int8 network's block rows stay close to
    the float ones, and a FIM hole completes block by block on it."""
    plain = load_model(checkpoints["plain"], device="cpu", dtype="float32")
    model = load_model(checkpoints["plain"], device="cpu", quantization="int8")
    assert model.quantization == "int8"
    ids = torch.tensor(layout_ids(plain, PREFIX, SUFFIX)[0])
    want, _ = run_rows(plain, BlockCache([]), ids, 4)
    got, _ = run_rows(model, BlockCache([]), ids, 4)
    assert float((got.float() - want).norm() / want.norm()) < 0.05
    result = infill(model, PREFIX, SUFFIX, InfillOptions(max_tokens=12, threshold=0.95))
    assert result.finish_reason in ("end", "max_tokens") and "<[" not in result.text
    assert result.steps >= 1


def test_a_hole_runs_at_its_cards_threshold_unless_the_editor_sets_one(pairs):
    """Stable-DiffCoder's card runs at threshold 0.95: an editor (or a service request) that
    leaves the threshold unset gets it, for completions and next edits; one that sets it gets
    its own."""
    import asyncio

    from diffusion_contract import edit_wire, wire
    from diffusion_lsp.service import infill_options
    from lsp_server.backends import CompletionJob, NextEditJob
    from lsp_server.backends.local import LocalBackend
    from model.engine import Engine

    model, _ = pairs["plain"]
    assert model.family.threshold == 0.95
    engine = Engine(model)
    seen = []
    real = engine.infill

    def infill_recording(prefix, suffix, options, *rest, **keywords):
        seen.append(options.threshold)
        return real(prefix, suffix, options, *rest, **keywords)

    engine.infill = infill_recording
    backend = LocalBackend()
    backend.engine = engine
    prompt = edit_wire.EditPrompt("a.py", "", "def area(w, h):\n    return w * h", 5, "\n", ())
    try:
        for threshold in (None, 0.5):
            job = CompletionJob(prefix=PREFIX, suffix=SUFFIX, max_tokens=4, single_line=False,
                                threshold=threshold)
            asyncio.run(backend.complete(job))
        completions = len(seen)
        for threshold in (None, 0.5):  # next edits too (nextEdit.threshold)
            asyncio.run(backend.next_edit(NextEditJob(prompt, max_tokens=8, threshold=threshold)))
    finally:
        engine.close()
    assert seen[:completions] == [0.95, 0.5]
    edits = seen[completions:]
    assert edits and set(edits) == {0.95, 0.5} and edits.index(0.5) == edits.count(0.95), edits
    unset = wire.decode_fim(b'{"model": "m", "prompt": "p"}')
    given = wire.decode_fim(b'{"model": "m", "prompt": "p", "threshold": 0.5}')
    assert infill_options(unset, model.family.threshold).threshold == 0.95
    assert infill_options(given, model.family.threshold).threshold == 0.5
    assert infill_options(unset).threshold == InfillOptions().threshold


def test_a_documents_kept_rows_hold_no_more_memory_than_they_count(pairs):
    """The prompt cache keeps copies of a block hole's prompt rows, not views that would keep
    the whole source (finished blocks, a layer loop's padding) alive uncounted."""
    model, _ = pairs["plain"]
    prefix, suffix = long_document(60)
    cache = PromptCache()
    infill(model, prefix, suffix, InfillOptions(max_tokens=8), cache=cache, document="doc")
    (entry,) = cache._entries.values()
    stored = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes()
                 for k, v in entry.layers)
    assert stored == entry.nbytes == cache.nbytes > 0
