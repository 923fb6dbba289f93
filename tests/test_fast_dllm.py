"""Fast-dLLM v2 (block diffusion with sub-blocks and shifted logits): a tiny checkpoint in the
published format, loaded by the project's loader into the stock Qwen2 class, against the
published network and `generate` (`tests.fast_dllm_v2_reference`): the same logits under its
block-causal mask, the same ids and forward count in exact mode."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding.block import WRITE_CHUNK, BlockCache, run_rows
from model.decoding.hole import layout_ids
from model.decoding.prompt_cache import PromptCache
from model.decoding.sampler import denoise_step, generate_exact, infill, new_state_from_ids
from model.network.families import FAMILIES, FAST_DLLM_V2, detect_family
from model.network.loader import load_model

from .fast_dllm_v2_reference import FastDllmV2Reference
from .fixtures_fast_dllm import MASK, STOP, write_fast_dllm_v2
from .helpers import one_thread  # noqa: F401 - autouse: tiny matmuls on one thread

# (stop row scale, scale of every output row): plain random (one position a step), ends often,
# sharp (the threshold commits several positions a step)
VARIANTS = {"plain": (1.0, 1.0), "ends": (3.0, 1.0), "sharp": (1.0, 400.0)}
# prompt lengths: inside the first block, one short of it, exactly one block (the reference
# never prefills it), one past it, two blocks (prefill and the argmax token), two and a bit
PROMPTS = (3, 31, 32, 33, 64, 70)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fast-dllm-v2")
    out = {}
    for name, (stop, sharpness) in VARIANTS.items():
        path = write_fast_dllm_v2(root / name, stop_boost=stop, sharpness=sharpness)
        reference = FastDllmV2Reference(path, json.loads((path / "config.json").read_text()))
        out[name] = (load_model(path, device="cpu", dtype="float32"), reference)
    return out


def prompt_of(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(seed))


def test_the_published_checkpoint_loads_as_fast_dllm_v2(pairs):
    model, _ = pairs["plain"]
    assert model.family.name == "fast-dllm-v2"
    assert type(model.network).__name__ == "Qwen2ForCausalLM"  # stock class, no remote code
    assert (model.ids.mask, model.ids.end_of_hole) == (MASK, STOP)
    family = model.family
    assert (family.block_length, family.sub_block_length, family.shifted_logits) == (32, 8, True)


def test_detected_by_its_config_not_by_any_qwen2():
    published = {"model_type": "Fast_dLLM_Qwen", "architectures": ["Fast_dLLM_QwenForCausalLM"]}
    assert FAST_DLLM_V2.matches(published, [])
    assert detect_family(published, ["|<MASK>|"]).name == "fast-dllm-v2"
    plain = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    assert not FAMILIES["fast-dllm-v2"].matches(plain, ["|<MASK>|"])


def test_logits_are_the_published_networks_under_its_mask(pairs):
    model, reference = pairs["plain"]
    ids = prompt_of(70)
    expected, _ = reference.forward(ids, None, False, block_size=32)
    hidden, _ = run_rows(model, BlockCache([]), ids[0], 32)
    with torch.inference_mode():
        ours = model.network.lm_head(hidden)
    assert torch.allclose(ours, expected[0], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        causal = model.network(input_ids=ids).logits[0]  # the stock class's own (causal) mask
    assert not torch.allclose(causal, expected[0], atol=1e-3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exact_mode_is_the_published_generate(pairs, variant):
    model, reference = pairs[variant]
    thresholds = (1.0, 0.9) if variant == "plain" else (1.0, 0.9, 0.5)
    stopped = several = 0
    for length in PROMPTS:
        prompt = prompt_of(length)
        for threshold in thresholds:
            expected, expected_forwards = reference.generate(prompt.clone(), 64,
                                                             threshold=threshold)
            ours, forwards = generate_exact(model, prompt, gen_length=64, threshold=threshold)
            assert torch.equal(ours, expected), (length, threshold)
            assert forwards == expected_forwards, (length, threshold)
            answer = expected[0, length:]
            stopped += int(STOP in answer.tolist())
            several += int(forwards < answer.numel())
    if variant == "ends":
        assert stopped >= 3  # the stop rule was exercised
    if variant == "sharp":
        assert several >= 6  # the threshold committed several positions a step


def steps_of(model, prompt: list[int], options: InfillOptions):
    state = new_state_from_ids(model, prompt, [], options)
    while not state.finished:
        denoise_step(model, [state])
    return state


@pytest.mark.parametrize("variant,threshold", [("plain", 1.0), ("sharp", 0.9)])
def test_completions_take_the_published_steps(pairs, variant, threshold):
    """Outside exact mode a hole runs the same steps on the same sampler (sub-blocks, shifted
    logits, the write forward's token), as long as nothing ends it: the same tokens from the
    same number of forwards as the published generate (prompts not of exactly one block). The
    tiny tokenizer knows few of the 152k ids, so the bans on ids without a token are lifted."""
    model, reference = pairs[variant]
    model = unbanned(model)
    for length in (3, 33, 64):
        prompt = prompt_of(length, seed=7)
        expected, expected_forwards = reference.generate(prompt.clone(), 64, threshold=threshold)
        answer = expected[0, length:].tolist()
        assert not set(answer) & model.ids.ends
        state = steps_of(model, prompt[0].tolist(),
                         InfillOptions(max_tokens=len(answer), threshold=threshold))
        assert state.hole.tolist() == answer, length
        assert state.forwards == expected_forwards, length
        assert state.finish_reason == "max_tokens"


def unbanned(model):
    """The model with every id sampleable (the tiny tokenizer knows few of the 152k ids)."""
    return dataclasses.replace(model, never_sample=torch.zeros_like(model.never_sample))


def test_a_step_commits_in_its_sub_block_only(pairs):
    model = unbanned(pairs["sharp"][0])
    state = new_state_from_ids(model, prompt_of(3)[0].tolist(), [],
                               InfillOptions(max_tokens=40, threshold=0.5))
    assert state.hole.numel() == 29  # the prompt's aligned block, completed
    several = 0
    while not state.finished:
        denoise_step(model, [state])
        done = [p for p, _ in state.trace[-1].committed]
        # sub-blocks of 8 aligned from the prompt's first token: positions 0-4, 5-12, ..
        assert len({(p + 3) // 8 for p in done}) == 1, done
        several += len(done) > 1
    assert several  # the threshold committed several positions in one step


def test_the_first_token_of_a_block_comes_from_the_write(pairs):
    """A block's first position is committed by the forward that writes the block before it
    (its last row's logits, shifted), not by a denoising forward of its own block."""
    model = unbanned(pairs["plain"][0])
    state = steps_of(model, prompt_of(33)[0].tolist(), InfillOptions(max_tokens=40))
    first = 64 - 33  # hole position of the second block's first token
    steps = [i for i, trace in enumerate(state.trace)
             if any(p == first for p, _ in trace.committed)]
    assert len(steps) == 1 and state.trace[steps[0]].committed == [(first, state.hole[first])]
    with torch.inference_mode():
        hidden, _ = run_rows(model, BlockCache([]), torch.tensor(state.sequence()[:64]), 32)
        expected = int(model.network.lm_head(hidden[-1]).argmax())
    assert int(state.hole[first]) == expected


def test_a_completion_ends_at_its_stop_token_and_shows_no_suffix(pairs):
    model, _ = pairs["ends"]
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    prefix_ids, suffix_ids = layout_ids(model, prefix, suffix)
    assert suffix_ids == [] and prefix_ids == model.tokenizer.encode(prefix).ids
    result = infill(model, prefix, suffix, InfillOptions(max_tokens=64, threshold=0.9))
    assert result.finish_reason in ("end", "max_tokens")
    assert "<|" not in result.text and "|<MASK>|" not in result.text


@pytest.mark.parametrize("variant", ["plain", "ends"])
def test_completions_with_and_without_the_prompt_cache_are_identical(pairs, variant):
    model, _ = pairs[variant]
    body = "".join(f"value_{i} = compute({i}, {i + 1})\n" for i in range(60))
    cache = PromptCache()
    options = InfillOptions(max_tokens=40, threshold=0.9)
    reused = []
    for text in ["", "a", "a +", "a + b"]:
        prefix = body + "def add(a, b):\n    return " + text
        cached = infill(model, prefix, "", options, cache=cache, document="doc")
        fresh = infill(model, prefix, "", options)
        assert cached.text == fresh.text
        assert [s.committed for s in cached.trace] == [s.committed for s in fresh.trace]
        reused.append(cached.reused_tokens)
    assert reused[0] == 0 and min(reused[1:]) >= WRITE_CHUNK


def test_it_runs_on_8_bit_weights(tmp_path):
    """Low-bit weights reach its block passes: rows close to the float ones under its mask, and
    a completion runs its sub-blocks on the int8 network."""
    path = write_fast_dllm_v2(tmp_path / "m")
    model = load_model(path, device="cpu", quantization="int8")
    assert model.quantization == "int8"
    ids = prompt_of(40)[0]
    want, _ = run_rows(load_model(path, device="cpu", dtype="float32"), BlockCache([]), ids, 32)
    got, _ = run_rows(model, BlockCache([]), ids, 32)
    assert float((got.float() - want).norm() / want.norm()) < 0.05
    result = infill(model, "def add(a, b):\n    return ", "", InfillOptions(max_tokens=40))
    assert result.finish_reason in ("end", "max_tokens") and "|<MASK>|" not in result.text
    assert result.steps >= 2
