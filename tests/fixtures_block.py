"""A tiny random Stable-DiffCoder checkpoint in its published on-disk format.

Written from the published format, not from model/network/families.py: config.json with the keys and
values of ByteDance-Seed/Stable-DiffCoder-8B-Base's config.json apart from sizes ("model_type":
"llama", "architectures": ["StableDiffcoderForCausalLM"], its "auto_map", "bos_token_id": 0,
"eos_token_id": 2, "vocab_size": 155136, rope_theta 5e5, ...), plain Llama weight names in
bfloat16 safetensors, and a tokenizer.json whose special tokens carry Seed-Coder's strings:
<[begin▁of▁sentence]> 0, <[PAD▁TOKEN]> 1, <[end▁of▁sentence]> 2, <[MASK_TOKEN]> 5 (the ids the
model card and `generate_block`'s defaults give), and the FIM tokens <[fim-prefix]>,
<[fim-suffix]>, <[fim-middle]> (Seed-Coder's report, section 2.2). The FIM tokens' ids were not
in anything read for this; the fixture puts them at 6..8 and the loader looks every special
token up by its string. The weights are written by `tests.stable_diffcoder_reference`'s
`StableDiffcoderForCausalLM` (the published class is LlamaForCausalLM plus its sampler).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from model.network.tiny import SAMPLE_CODE
from model.network.tokenizer import train_tokenizer

from .stable_diffcoder_reference import StableDiffcoderForCausalLM

VOCAB = 155136  # Stable-DiffCoder-8B's rows
BOS, PAD, EOS, MASK = 0, 1, 2, 5
SPECIAL_TOKENS = [  # by id, from 0
    "<[begin\u2581of\u2581sentence]>", "<[PAD\u2581TOKEN]>", "<[end\u2581of\u2581sentence]>",
    "<[reserved-3]>", "<[reserved-4]>", "<[MASK_TOKEN]>",
    "<[fim-prefix]>", "<[fim-suffix]>", "<[fim-middle]>",
]
SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
PUBLISHED_CONFIG = {
    "architectures": ["StableDiffcoderForCausalLM"],
    "auto_map": {"AutoModel": "modeling_stable_diffcoder.StableDiffcoderForCausalLM",
                 "AutoModelForCausalLM": "modeling_stable_diffcoder.StableDiffcoderForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.1, "bos_token_id": BOS,
    "eos_token_id": EOS, "hidden_act": "silu", "initializer_range": 0.009882118,
    "layer_norm_eps": None, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "resid_pdrop": 0.1, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "5.3.0",
    "use_cache": True, "vocab_size": VOCAB,
}


def write_tokenizer(directory: Path, fim: bool = True) -> None:
    """tokenizer.json: the special tokens at ids 0..8 (0..5 without the FIM tokens), then a
    byte-level BPE on sample code."""
    specials = SPECIAL_TOKENS if fim else SPECIAL_TOKENS[:MASK + 1]
    tokenizer = train_tokenizer([SAMPLE_CODE] * 4, 400, specials, min_frequency=1)
    data = json.loads(tokenizer.to_str())
    for entry in data["added_tokens"]:
        entry["normalized"] = False
    (directory / "tokenizer.json").write_text(json.dumps(data))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": SPECIAL_TOKENS[BOS], "eos_token": SPECIAL_TOKENS[EOS],
        "pad_token": SPECIAL_TOKENS[PAD], "mask_token": SPECIAL_TOKENS[MASK]}))


def write_stable_diffcoder(directory: Path, seed: int = 0, eos_boost: float = 1.0,
                           fim: bool = True) -> Path:
    """The checkpoint in `directory`; `eos_boost` scales eos's output row so that the random
    network ends its answers sometimes; `fim` False leaves the FIM tokens out."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    write_tokenizer(directory, fim)
    network = StableDiffcoderForCausalLM(LlamaConfig(
        vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-6, **SHAPE))
    with torch.no_grad():
        network.lm_head.weight[EOS] *= eos_boost
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in network.state_dict().items()}
    (directory / "config.json").write_text(json.dumps({**PUBLISHED_CONFIG, **SHAPE}, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def official_model(directory: Path, attention: str = "sdpa") -> StableDiffcoderForCausalLM:
    """The checkpoint loaded by the published class (as transformers would, in float32)."""
    model = StableDiffcoderForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation=attention)
    return model.eval()


def generate_block_both(model, official: StableDiffcoderForCausalLM, prompt_length: int,
                        threshold: float | None) -> tuple[tuple, tuple]:
    """(ours, the official): the ids and forward count of `generate_exact` and of the published
    `generate_block` for a seeded random prompt (block length 4, steps = gen length = 16)."""
    from model.decoding.sampler import generate_exact

    prompt = torch.randint(10, 300, (1, prompt_length),
                           generator=torch.Generator().manual_seed(prompt_length))
    expected, expected_forwards = official.generate_block(
        prompt.clone(), steps=16, gen_length=16, block_length=4, threshold=threshold,
        eos_id=EOS)
    ids, forwards = generate_exact(model, prompt, gen_length=16, steps=16, block_length=4,
                                   threshold=threshold, eos_id=EOS)
    return (ids.tolist(), forwards), (expected.tolist(), expected_forwards)
