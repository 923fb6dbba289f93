"""Tiny random-weight checkpoints for every family, with the family's special tokens.

Their output is noise: they exist so that the loader, sampler, engine and server can be
tested (and the CLI tried) without downloading anything, small and fast (a 400-token
vocabulary). `python -m model.network.tiny DIR --family F` writes one. model/network/published.py
writes the published on-disk formats instead (published ids, vocabulary sizes, config keys
and weight names) for the family tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model.network.families import get_family
from model.network.tokenizer import train_tokenizer

SAMPLE_CODE = '''
def add(a, b):
    return a + b

def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

for i in range(10):
    print(i, add(i, 1))

import os
path = os.path.join("a", "b")
values = [x * 2 for x in range(100) if x % 3 == 0]
result = {"key": "value", "count": len(values)}
'''

FAMILY_SPECIAL_TOKENS = {
    "default": ["<|bos|>", "<|eos|>", "<|mask|>", "<|endofhole|>", "<|file_sep|>"],
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"],
    "diffucoder": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>", "<|dlm_pad|>"],
    "dreamon": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>",
                "<|expand|>", "<|delete|>"],
    "open-dcoder": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<M>"],
    "llada": ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>"],
}
# config.json model_type per Qwen2-shaped family (what the published checkpoints say)
QWEN2_MODEL_TYPES = {"dream": "Dream", "diffucoder": "Dream", "dreamon": "Dream",
                     "open-dcoder": "qwen2"}
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 2048}


def _olmo_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Llama weight names written back in LLaDA's OLMo-style layout (independent of families.py)."""
    block = {
        "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
        "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
        "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ff_norm",
    }
    out = {}
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            module, param = rest.rsplit(".", 1)
            out[f"model.transformer.blocks.{index}.{block[module]}.{param}"] = tensor
        elif name.startswith("model.embed_tokens."):
            out[name.replace("model.embed_tokens.", "model.transformer.wte.")] = tensor
        elif name.startswith("model.norm."):
            out[name.replace("model.norm.", "model.transformer.ln_f.")] = tensor
        elif name.startswith("lm_head."):
            out[name.replace("lm_head.", "model.transformer.ff_out.")] = tensor
        else:
            raise KeyError(name)
    return out


def write_tiny_model(directory: str | Path, family: str = "default", seed: int = 0,
                     vocab_size: int = 400) -> Path:
    """Write config.json, tokenizer.json and model.safetensors of a tiny random model."""
    fam = get_family(family)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer([SAMPLE_CODE] * 4, vocab_size, FAMILY_SPECIAL_TOKENS[family],
                                min_frequency=1)
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    if fam.architecture == "qwen2":
        config = Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **TINY_SHAPE)
        network = Qwen2ForCausalLM(config)
        raw = config.to_dict()
        if family == "default":
            raw["diffusion_lsp_family"] = "default"
        else:
            raw["model_type"] = QWEN2_MODEL_TYPES[family]
        state = network.state_dict()
    else:
        config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **TINY_SHAPE)
        network = LlamaForCausalLM(config)
        raw = {
            "model_type": "llada", "architectures": ["LLaDAModelLM"],
            "d_model": TINY_SHAPE["hidden_size"], "n_heads": TINY_SHAPE["num_attention_heads"],
            "n_kv_heads": TINY_SHAPE["num_key_value_heads"],
            "n_layers": TINY_SHAPE["num_hidden_layers"],
            "mlp_hidden_size": TINY_SHAPE["intermediate_size"], "vocab_size": vocab,
            "embedding_size": vocab, "max_sequence_length": 2048, "rms_norm_eps": 1e-6,
            "rope_theta": config.rope_parameters["rope_theta"], "include_bias": False,
            "weight_tying": False,
            "mask_token_id": tokenizer.token_to_id("<|mdm_mask|>"),
        }
        state = _olmo_names(network.state_dict())
    (directory / "config.json").write_text(json.dumps(raw, indent=2, default=str))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--family", default="default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_model(args.directory, args.family, args.seed))


if __name__ == "__main__":
    main()
