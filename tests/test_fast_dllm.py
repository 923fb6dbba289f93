"""Fast-dLLM v2 (block diffusion with sub-blocks and shifted logits): a tiny checkpoint in the
published format, loaded by the project's loader into the stock Qwen2 class, against the
published network and `generate` (`tests.fast_dllm_v2_reference`): the same logits under its
block-causal mask, the same ids and forward count in exact mode."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding.block import BlockCache, run_rows
from model.decoding.sampler import generate_exact, new_state_from_ids
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


def test_completions_outside_exact_mode_are_refused_plainly(pairs):
    model, _ = pairs["plain"]
    with pytest.raises(ValueError, match="exact mode only"):
        new_state_from_ids(model, [1, 2, 3], [], InfillOptions(max_tokens=8))
