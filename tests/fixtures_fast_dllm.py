"""A tiny random Fast-dLLM v2 checkpoint in its published on-disk format.

Written from the published format, not from model/network/families.py: config.json with Qwen2.5-7B-
Instruct's keys and values apart from sizes (Fast_dLLM_v2_7B is that model fine-tuned: "bos"
151643, "eos" 151645, rope_theta 1e6, untied, "vocab_size" 152064, ...) plus what Fast-dLLM v2's
remote code adds: "model_type": "Fast_dLLM_Qwen" (its `Fast_dLLM_QwenConfig`), "architectures":
["Fast_dLLM_QwenForCausalLM"], its "auto_map" (configuration.py / modeling.py) and "bd_size": 32.
The hub's config.json itself was not read for this (no hub access). Weights: Qwen2's names (the
published modeling.py's modules are Qwen2's: model.layers.N.self_attn.q_proj with bias, ...),
bfloat16 safetensors. tokenizer.json: Qwen2.5's added tokens at 151643..151664 and the mask
|<MASK>| at 151665 (`mask_id=151665` in the published `generate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from model.network.published import _qwen2_tokens, write_tokenizer

VOCAB = 152064
MASK, STOP = 151665, 151645
SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
PUBLISHED_CONFIG = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"],
    "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                 "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
    "attention_dropout": 0.0, "bd_size": 32, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "Fast_dLLM_Qwen", "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": VOCAB,
}


def write_fast_dllm_v2(directory: Path, seed: int = 0, stop_boost: float = 1.0,
                       sharpness: float = 1.0) -> Path:
    """The checkpoint in `directory`; `stop_boost` scales <|im_end|>'s output row so that the
    random network ends sometimes, `sharpness` every output row (confident predictions)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    write_tokenizer(directory, _qwen2_tokens({"|<MASK>|": MASK}))
    network = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=False,
                                           max_position_embeddings=32768, **SHAPE))
    with torch.no_grad():
        network.lm_head.weight[STOP] *= stop_boost
        network.lm_head.weight *= sharpness
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in network.state_dict().items()}
    config = {**PUBLISHED_CONFIG, **SHAPE, "max_window_layers": SHAPE["num_hidden_layers"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
