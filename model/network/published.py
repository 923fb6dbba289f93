"""Tiny random checkpoints in each published family's OFFICIAL on-disk format (the tests'
family fixtures, and benchmarks/quantization.py's tiny models).

Written from the published formats, not from this project's family table (so a wrong entry
in model/network/families.py shows up as a test failure): config.json with the published keys and
values apart from sizes, the published weight names, and a small byte-level BPE tokenizer
whose special tokens sit at their published ids (the vocabulary has a gap below them, and the
network's vocabulary is the published one: 152064 / 151936 / 126464 rows).

Sources of the facts (read through the project's search tool):
- Dream-Coder-v0-7B / DiffuCoder-7B: apple/DiffuCoder-7B-Instruct config.json ("architectures":
  ["DreamModel"], "model_type": "Dream", "mask_token_id": 151666, "bos_token_id": 151643,
  "vocab_size": 152064, ...); Dream-Coder derivatives' config.json carry "bos_token_id": 151665.
  Their tokenizer ships as vocab.json + merges.txt + added tokens (no tokenizer.json).
  Qwen2.5's added tokens at 151643..151664 (<|endoftext|> ... <|file_sep|>, the last eight with
  "special": false).
- DreamOn-v0-7B: DreamLM/DreamOn eval/generator.py (`expand_id = 151667`), demo/quickstart.py.
- Open-dCoder-0.5B: pengzhangzhi/Open-dLLM tasks/train_torch.py (mask token "<M>" added after
  the Qwen2.5 vocabulary), configs/pretrain/qwen2_5_coder_500M.yaml (Qwen2.5-Coder-0.5B:
  model_type "qwen2", tied embeddings, 151936 rows).
- LLaDA-8B: LLaDA-8B-Instruct's config.json ("model_type": "llada", "d_model", "n_layers",
  "mlp_hidden_size", "embedding_size": 126464, "mask_token_id": 126336, "eos_token_id": 126081,
  ...); ML-GSAI/LLaDA generate.py (mask 126336, <|endoftext|> 126081, <|eot_id|> 126348).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model.network.tiny import SAMPLE_CODE
from model.network.tokenizer import train_tokenizer

BPE_VOCAB = 300
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64

QWEN2_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN2_SPECIAL_FLAGGED = 14  # the first 14 are "special": true, the rest "special": false


def _qwen2_tokens(extra: dict[str, int]) -> dict[str, tuple[int, bool]]:
    tokens = {t: (151643 + i, i < QWEN2_SPECIAL_FLAGGED) for i, t in enumerate(QWEN2_ADDED)}
    tokens.update({t: (i, True) for t, i in extra.items()})
    return tokens


@dataclass(frozen=True)
class Spec:
    """One published checkpoint format."""

    family: str  # the family model/network/families.py should detect
    kind: str  # "dream" (DreamModel) | "qwen2" | "llada"
    vocab: int  # rows of the embedding / lm_head
    tokens: dict[str, tuple[int, bool]]  # special token -> (id, "special" flag)
    config: dict  # published non-size config.json keys
    tied: bool = False


DREAM_CONFIG = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                 "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151665, "eos_token_id": 151643, "hidden_act": "silu",
    "initializer_range": 0.02, "mask_token_id": 151666, "model_type": "Dream",
    "pad_token_id": 151643, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False,
}

SPECS: dict[str, Spec] = {
    "dream": Spec("dream", "dream", 152064,
                  _qwen2_tokens({"<|beginoftext|>": 151665, "<|mask|>": 151666}), DREAM_CONFIG),
    "diffucoder": Spec(
        "diffucoder", "dream", 152064,
        _qwen2_tokens({"<|beginoftext|>": 151665, "<|mask|>": 151666, "<|dlm_pad|>": 151667}),
        {**DREAM_CONFIG, "bos_token_id": 151643, "use_mrope": False,
         "transformers_version": "4.51.3"}),
    "dreamon": Spec(
        "dreamon", "dream", 152064,
        _qwen2_tokens({"<|beginoftext|>": 151665, "<|mask|>": 151666, "<|expand|>": 151667,
                       "<|delete|>": 151668}),
        DREAM_CONFIG),
    "open-dcoder": Spec(
        "open-dcoder", "qwen2", 151936, _qwen2_tokens({"<M>": 151665}),
        {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
         "eos_token_id": 151643, "hidden_act": "silu", "initializer_range": 0.02,
         "model_type": "qwen2", "rms_norm_eps": 1e-06, "rope_scaling": None,
         "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": True,
         "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
         "use_sliding_window": False},
        tied=True),
    "llada": Spec(
        "llada", "llada", 126464,
        {"<|startoftext|>": (126080, True), "<|endoftext|>": (126081, True),
         "<|mdm_mask|>": (126336, True), "<|start_header_id|>": (126346, True),
         "<|end_header_id|>": (126347, True), "<|eot_id|>": (126348, True)},
        {"activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
         "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
         "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
         "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                      "AutoModel": "modeling_llada.LLaDAModelLM",
                      "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
         "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
         "embedding_dropout": 0.0, "eos_token_id": 126081, "flash_attention": False,
         "include_bias": False, "include_qkv_bias": False, "init_device": "meta",
         "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
         "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": 126336,
         "max_sequence_length": 4096, "mlp_ratio": 4, "model_type": "llada",
         "multi_query_attention": None, "pad_token_id": 126081, "precision": "amp_bf16",
         "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
         "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
         "use_cache": False, "vocab_size": 126464, "weight_tying": False}),
}
FAMILY_SPECS = tuple(SPECS)


def write_bpe_files(directory: Path, tokens: dict[str, tuple[int, bool]]) -> None:
    """How Dream-Coder, DiffuCoder and DreamOn publish their tokenizer: vocab.json + merges.txt
    (a BPE on sample code, padded with filler entries up to the first added id, since added
    tokens follow the base vocabulary) + tokenizer_config.json's added_tokens_decoder."""
    tokenizer = train_tokenizer([SAMPLE_CODE] * 4, BPE_VOCAB, [], min_frequency=1)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    first_added = min(token_id for token_id, _ in tokens.values())
    vocab.update({f"filler{i}": i for i in range(len(vocab), first_added)})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    decoder = {str(token_id): {"content": token, "lstrip": False, "normalized": False,
                               "rstrip": False, "single_word": False, "special": special}
               for token, (token_id, special) in sorted(tokens.items(), key=lambda kv: kv[1][0])}
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": decoder, "tokenizer_class": "DreamTokenizer"}))


def write_tokenizer(directory: Path, tokens: dict[str, tuple[int, bool]]) -> None:
    """tokenizer.json: a byte-level BPE on sample code, `tokens` added at their published ids."""
    tokenizer = train_tokenizer([SAMPLE_CODE] * 4, BPE_VOCAB, [], min_frequency=1)
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [
        {"id": token_id, "content": token, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": special}
        for token, (token_id, special) in sorted(tokens.items(), key=lambda kv: kv[1][0])
    ]
    for token, (token_id, _) in tokens.items():
        data["model"]["vocab"][token] = token_id
    (directory / "tokenizer.json").write_text(json.dumps(data))


def _olmo_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaDA's published weight names (model.transformer.wte / blocks.N.q_proj / attn_out /
    ff_proj / up_proj / ff_out / attn_norm / ff_norm / ln_f / ff_out), written here from the
    published checkpoint's index rather than from the loader's rename table."""
    block = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
             "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
             "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    top = {"model.embed_tokens.weight": "model.transformer.wte.weight",
           "model.norm.weight": "model.transformer.ln_f.weight",
           "lm_head.weight": "model.transformer.ff_out.weight"}
    out = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)
        module, param = rest.rsplit(".", 1)
        out[f"model.transformer.blocks.{index}.{block[module]}.{param}"] = tensor
    return out


def boost_rows(lm_head: torch.Tensor, ids: list[int], factor: float) -> None:
    """Scale the output rows of `ids` so that a random network prefers those tokens."""
    with torch.no_grad():
        lm_head[ids] *= factor


def write_checkpoint(directory: Path, name: str, seed: int = 0,
                     boost: tuple[str, ...] = (), factor: float = 30.0) -> Path:
    """Write checkpoint `name` (a key of SPECS) into `directory`; rows of the `boost` tokens
    are scaled by `factor` so the random model predicts them often."""
    spec = SPECS[name]
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if spec.kind == "dream":
        write_bpe_files(directory, spec.tokens)
    else:
        write_tokenizer(directory, spec.tokens)
    shape = {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
             "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
             "num_key_value_heads": KV_HEADS}
    if spec.kind == "llada":  # LLaDA-8B has no grouped-query attention: n_kv_heads = n_heads
        config = {**spec.config, "d_model": HIDDEN, "n_heads": HEADS, "n_kv_heads": HEADS,
                  "n_layers": LAYERS, "mlp_hidden_size": INTERMEDIATE,
                  "embedding_size": spec.vocab}
        network = LlamaForCausalLM(LlamaConfig(vocab_size=spec.vocab, tie_word_embeddings=False,
                                               max_position_embeddings=4096,
                                               **{**shape, "num_key_value_heads": HEADS}))
    else:
        network = Qwen2ForCausalLM(Qwen2Config(vocab_size=spec.vocab,
                                               tie_word_embeddings=spec.tied,
                                               max_position_embeddings=32768, **shape))
        config = {**spec.config, **shape, "vocab_size": spec.vocab,
                  "max_position_embeddings": 32768, "max_window_layers": LAYERS}
    boost_rows(network.lm_head.weight, [spec.tokens[t][0] for t in boost], factor)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in network.state_dict().items()}
    if spec.tied:
        state.pop("lm_head.weight")
    if spec.kind == "llada":
        state = _olmo_state(state)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / "model.safetensors"))
    return directory


def banned_strings(spec: Spec) -> list[str]:
    """The token strings no completion may contain: every added token of the checkpoint."""
    return list(spec.tokens)


def leaking_tokens(spec: Spec) -> tuple[str, ...]:
    """Added tokens that neither end nor edit the hole nor are the mask: the ones that leaked
    into completions (<|image_pad|>, <tool_call>, <|repo_name|>, <|start_header_id|>, ...)."""
    not_text = {"<|endoftext|>", "<|im_end|>", "<|dlm_pad|>", "<|eot_id|>", "<|expand|>",
                "<|delete|>", "<|mask|>", "<M>", "<|mdm_mask|>"}
    return tuple(t for t in spec.tokens if t not in not_text)
