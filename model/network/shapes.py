"""Random-weight models of published shapes: speed measured without downloading weights.

Speed does not depend on the weights' values at a fixed number of tokens per step, so a model
of Dream-Coder-7B's shape (Qwen2.5-7B) with random weights, built directly on the device, times
the same work as the real one. `random:SHAPE` as a model path (the server's `model.path`,
`--model` on the command line) loads one: for benchmarks, never for completions anyone reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.network import quantize
from model.network.families import DREAM, STABLE_DIFFCODER, Family
from model.network.loader import (
    BUNDLED_DIR,
    TOKENIZER_FILE,
    LoadedModel,
    ModelLoadError,
    make_bidirectional,
    pick_device,
    pick_dtype,
    quantization_plan,
    resolve_special_ids,
)
from model.network.tiny import FAMILY_SPECIAL_TOKENS, SAMPLE_CODE

RANDOM_PREFIX = "random:"

SHAPES = {
    # Dream-Coder-v0-7B / Qwen2.5-7B
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0},
    # Open-dCoder-0.5B / Qwen2.5-(Coder-)0.5B: the size people run on a laptop CPU
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                     "tie_word_embeddings": True},
    # a few MB of weights: the same code path on a CPU, for tests
    "tiny-qwen2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                   "max_position_embeddings": 2048, "rope_theta": 1000000.0},
}
# block diffusion (`model.decoding.block`): Llama-shaped, the stable-diffcoder family
BLOCK_SHAPES = {
    # Stable-DiffCoder-8B / Seed-Coder-8B (its config.json)
    "seed-coder-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 155136,
                      "max_position_embeddings": 8192, "rope_theta": 500000.0,
                      "rms_norm_eps": 1e-6},
    # Seed-Coder's Llama layout at Qwen2.5-0.5B's sizes: block diffusion timed on a CPU
    "small-seed-coder": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                         "num_attention_heads": 14, "num_key_value_heads": 2,
                         "vocab_size": 155136, "max_position_embeddings": 8192,
                         "rope_theta": 500000.0, "rms_norm_eps": 1e-6},
    "tiny-seed-coder": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                        "max_position_embeddings": 2048, "rope_theta": 500000.0},
}
# small enough without a GPU
CPU_SHAPES = ("qwen2.5-0.5b", "tiny-qwen2", "small-seed-coder", "tiny-seed-coder")
TINY_SHAPES = ("tiny-qwen2", "tiny-seed-coder")
INIT_STD = 0.02  # Qwen2's initializer_range


def is_random(name_or_path: object) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(RANDOM_PREFIX)


def random_model_of_shape(shape: str, device: str = "auto", dtype: str = "auto",
                          quantization: str = "auto") -> LoadedModel:
    """A `dream`-family model of a published shape with random weights (a `stable-diffcoder`
    one for the BLOCK_SHAPES), made on `device` in `dtype` (auto: bf16 on CUDA; on a CPU what
    `model.catalog.cpu` measured fastest), its decoder layers' linear weights in `quantization`
    (model.network.quantize; made and quantized one layer at a time, so a 7B shape fits where its
    bf16 weights would not)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if shape not in SHAPES and shape not in BLOCK_SHAPES:
        raise ModelLoadError(f"unknown shape {shape!r}; known: "
                             f"{', '.join([*SHAPES, *BLOCK_SHAPES])}")
    torch_device = pick_device(device)
    if torch_device.type != "cuda" and shape not in CPU_SHAPES:
        raise ModelLoadError(f"shape {shape} needs a CUDA GPU (its bf16 weights take many GB)")
    block = shape in BLOCK_SHAPES
    family = STABLE_DIFFCODER if block else DREAM
    config_class, network_class = ((LlamaConfig, LlamaForCausalLM) if block
                                   else (Qwen2Config, Qwen2ForCausalLM))
    config = config_class(**{"tie_word_embeddings": False,
                             **(BLOCK_SHAPES[shape] if block else SHAPES[shape])})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        network = network_class(config)
    plan = quantization_plan(quantize.check_choice(quantization), network, torch_device)
    torch_dtype = (plan.kernel.dtype if plan.kernel is not None else
                   pick_dtype(dtype, torch_device, sum(p.numel() for p in network.parameters())))
    network = random_weights(network, config, torch_device, torch_dtype, plan.kernel)
    make_bidirectional(network)
    tokenizer = shape_tokenizer(shape, family)
    return LoadedModel(network, tokenizer, family,
                       resolve_special_ids(tokenizer, family, Path()),
                       torch_device, torch_dtype, Path(f"{RANDOM_PREFIX}{shape}"),
                       quantization=plan.scheme, quantization_notice=plan.notice)


def load_random(name: str, device: str = "auto", dtype: str = "auto",
                quantization: str = "auto") -> LoadedModel:
    """`random:SHAPE` -> that shape's random-weight model."""
    return random_model_of_shape(name.removeprefix(RANDOM_PREFIX), device, dtype, quantization)


@torch.no_grad()
def random_weights(network: torch.nn.Module, config, device: torch.device,
                   dtype: torch.dtype, kernel: quantize.Kernel | None = None) -> torch.nn.Module:
    """`network` (built on the meta device) with N(0, INIT_STD) weights and unit norms, made
    directly in `dtype` on `device`, one part at a time (each decoder layer then quantized
    by `kernel`, where given): seconds for 0.5B parameters, where transformers' own
    initialisation takes minutes on a 2-core CPU."""
    inner = network.model
    network.requires_grad_(False)
    for part in (inner.embed_tokens, inner.norm, network.lm_head, *inner.layers):
        part.to_empty(device=device).to(dtype)
        for name, parameter in part.named_parameters():
            if name.endswith("norm.weight") or part is inner.norm:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, INIT_STD)
        if kernel is not None and part not in (inner.embed_tokens, inner.norm, network.lm_head):
            quantize.quantize_module(part, kernel)
    quantize.tie_or_quantize_head(network, kernel)
    network.model.rotary_emb = type(network.model.rotary_emb)(config=config).to(device)
    return network.eval()


def special_tokens(family: Family) -> list[str]:
    """The special tokens a random model of `family` needs in its tokenizer."""
    if family is DREAM:
        return FAMILY_SPECIAL_TOKENS["dream"]
    return [t for t in (family.end_of_hole_token, family.mask_token, family.fim_suffix_token,
                        family.fim_prefix_token, family.fim_middle_token) if t is not None]


def shape_tokenizer(shape: str, family: Family = DREAM):
    """The tokenizer a random model of `shape` gets: a 400-piece one for the tiny shapes (their
    vocabulary has 512 rows), the bundled code BPE for published shapes."""
    if shape not in TINY_SHAPES:
        return code_tokenizer(family)
    from model.network.tokenizer import train_tokenizer

    return train_tokenizer([SAMPLE_CODE] * 4, 400, special_tokens(family), 1)


def code_tokenizer(family: Family = DREAM):
    """The bundled model's code BPE (8,192 pieces) with the family's special tokens added:
    random-weight models of a published shape get contexts of a realistic number of tokens (a
    real code tokenizer; Qwen2.5's own cannot be downloaded here)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(BUNDLED_DIR / TOKENIZER_FILE))
    tokenizer.add_special_tokens(special_tokens(family))
    return tokenizer
