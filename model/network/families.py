"""Model families as data: what differs between diffusion code models.

One sampler serves every family. A family says which special tokens mean "mask", "end of
hole", "nothing here" (pad), "make room" (expand) and "drop this position" (delete); whether
the network's logits are shifted (Dream: position i predicts token i+1, inherited from the
autoregressive model it was adapted from) or not (LLaDA, and the bundled model); how prefix /
hole / suffix are laid out; how the checkpoint's weights map onto a stock transformers class;
and how to recognise a checkpoint of the family.

Every fact below cites the file it was read from. A checkpoint that differs (another mask
string, a renamed pad token) needs no code change: a `diffusion_lsp` block in its config.json,
or `--family-override KEY=VALUE` on the command line, overrides any token field
(`apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# The config.json block that pins a family and overrides its fields, e.g.
#   {"diffusion_lsp": {"family": "dream", "mask_token": "<M>"}}
CONFIG_BLOCK = "diffusion_lsp"
LEGACY_CONFIG_KEY = "diffusion_lsp_family"  # older checkpoints (the bundled model) name it here
FAMILY_KEY = "family"

# Qwen2.5's added tokens at ids 151643..151664, shared by every Qwen-based family below
# (a Qwen2.5 tokenizer_config.json's added_tokens_decoder; several are "special": false,
# so skip_special_tokens keeps them in decoded text).
QWEN2_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
QWEN2_FIRST_ADDED_ID = 151643


@dataclass(frozen=True)
class Family:
    """Everything the loader and sampler need to know about one model family."""

    name: str
    architecture: str  # "qwen2" | "llama": the stock transformers class the weights load into
    mask_token: str  # the [MASK] a hole starts as
    end_of_hole_token: str  # a hole position decoding to this means "no more text here"
    bos_token: str | None  # put before the prefix (always with always_bos; else when empty)
    eos_token: str | None  # put after the suffix
    shifted_logits: bool  # True: logits at position i predict token i+1 (Dream)
    always_bos: bool = False  # put bos_token first even when the prefix is not empty
    # (pattern, replacement) pairs applied with re.sub, in order, to every weight name
    weight_renames: tuple[tuple[str, str], ...] = ()
    # detection: config.json's model_type is one of these ...
    model_types: tuple[str, ...] = ()
    # ... and the tokenizer holds every one of these tokens (tells variants of one model_type
    # apart: DiffuCoder and DreamOn are both model_type "Dream")
    detect_tokens: tuple[str, ...] = ()
    # ... or config.json's "architectures" names one of these (a class only this family uses)
    detect_architectures: tuple[str, ...] = ()
    extra_end_tokens: tuple[str, ...] = field(default=())  # also end the hole (e.g. <|im_end|>)
    pad_token: str | None = None  # "nothing here": ends the hole, never text (DiffuCoder)
    expand_token: str | None = None  # committed: becomes two masks (DreamOn)
    delete_token: str | None = None  # committed: the position disappears (DreamOn)
    # with delete_token: a committed delete also deletes every still-masked position after
    # it (DreamOn's `pad_delete_to_right`); committed tokens after it stay
    delete_pads_right: bool = False
    # block diffusion: blocks of this many tokens, aligned from the prompt's first token,
    # bidirectional inside a block and causal across blocks (`model.decoding.block`); None: the
    # whole sequence attends both ways (the full-canvas families)
    block_length: int | None = None
    # block diffusion denoised this many positions at a time inside a block, left to right
    # (Fast-dLLM v2's `small_block_size`); None: the whole block at once
    sub_block_length: int | None = None
    # block diffusion, exact mode: when the published sampler looks for its end token.
    # "full-block": once a block is full, in its generated part, the answer cut at that block's
    # end (Stable-DiffCoder's `generate_block`); "settled": as soon as an end token has no mask
    # before it, the answer cut after it (Fast-dLLM v2's `generate`)
    block_stop: str = "full-block"
    # the confidence threshold its card runs with: a hole's threshold where the editor or the
    # request leaves it unset (None: the sampler's default, 0.9)
    threshold: float | None = None
    # how prefix and suffix surround the hole: "canvas" (prefix, masks, suffix) or a FIM
    # layout with the three tokens below (FIM_LAYOUTS); the hole then comes last
    fim_layout: str = "canvas"
    fim_prefix_token: str | None = None
    fim_suffix_token: str | None = None
    fim_middle_token: str | None = None

    def rename_weight(self, name: str) -> str:
        for pattern, replacement in self.weight_renames:
            name = re.sub(pattern, replacement, name)
        return name

    def matches(self, config: Mapping, tokens: Iterable[str]) -> bool:
        """True when `config` (config.json) and the tokenizer's `tokens` are this family's."""
        if str(config.get("model_type", "")) not in self.model_types:
            return False
        if set(config.get("architectures") or ()) & set(self.detect_architectures):
            return True
        vocabulary = set(tokens)
        return all(token in vocabulary for token in self.detect_tokens)


# The bundled model: trained by this project (model/train), Qwen2-shaped, bidirectional.
DEFAULT = Family(
    name="default",
    architecture="qwen2",
    mask_token="<|mask|>",
    end_of_hole_token="<|endofhole|>",
    bos_token="<|bos|>",
    eos_token="<|eos|>",
    shifted_logits=False,
    always_bos=True,
    model_types=("diffusion-lsp",),
)

# Dream-Coder-v0-7B (and Dream-v0-7B): Qwen2 weight names under model_type "Dream" (config.json:
# "model_type": "Dream", "mask_token_id": 151666 = <|mask|>, "bos_token_id": 151665 =
# <|beginoftext|>, "eos_token_id"/"pad_token_id": 151643 = <|endoftext|>). Logits keep the
# autoregressive shift: DreamLM/Dream's generation_utils (and DreamOn eval/generator.py:
# `logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)`). Neither Dream-Coder nor
# DiffuCoder publishes an infilling prompt: their demos (DreamLM/Dream demo_completion.py,
# apple/ml-diffucoder inference_demo.py) feed the tokenized text as it is, and the Qwen2
# tokenizer adds no bos. So the layout is prefix, masks, suffix; a bos only when the prefix is
# empty, since a shifted model needs a token before the hole. The answer ends at the eos
# (`split(tokenizer.eos_token)` in demo_completion.py) or the chat end <|im_end|>.
DREAM = Family(
    name="dream",
    architecture="qwen2",
    mask_token="<|mask|>",
    end_of_hole_token="<|endoftext|>",
    bos_token="<|endoftext|>",
    eos_token=None,
    shifted_logits=True,
    model_types=("Dream", "dream"),
    extra_end_tokens=("<|im_end|>",),
)

# DiffuCoder-7B-Base / -Instruct / -cpGRPO (apple/ml-diffucoder): the Dream architecture and
# config (apple/DiffuCoder-7B-Instruct config.json: "model_type": "Dream", "mask_token_id":
# 151666), plus a pad token <|dlm_pad|> the model writes after its answer: "nothing here". The
# reference cuts the answer at it (ml-diffucoder inference_demo.py and README:
# `generations[0].split('<|dlm_pad|>')[0]`), so it ends the hole and is never text.
DIFFUCODER = dataclasses.replace(
    DREAM,
    name="diffucoder",
    detect_tokens=("<|dlm_pad|>",),
    pad_token="<|dlm_pad|>",
)

# DreamOn-v0-7B (DreamLM/DreamOn): Dream-Coder further trained for variable-length infilling.
# Its infill prompt is [bos] + prefix + masks + suffix + [eos] (DreamOn demo/quickstart.py
# `process_infilling_prompt`; eval/generator.py `infilling_with_expansion` encodes the prefix
# with add_bos=True and the suffix with add_eos=True). <|expand|> (id 151667: eval/generator.py
# `self.expand_id = 151667`, src/trainer/sft_expand_dataset.py `expand_token_id = 151667`)
# committed at a position turns it into two masks; <|delete|> (the paper's contraction token;
# the released generator's `delete_token_id`, with `pad_delete_to_right`) makes it disappear,
# and every still-masked position after it with it. Expansion is banned once the hole has
# reached its token budget (`logits[:, expand_id] -= 1e9` in the same file).
DREAMON = dataclasses.replace(
    DREAM,
    name="dreamon",
    bos_token="<|beginoftext|>",
    eos_token="<|endoftext|>",
    always_bos=True,
    detect_tokens=("<|expand|>",),
    expand_token="<|expand|>",
    delete_token="<|delete|>",
    delete_pads_right=True,
)

# Open-dCoder-0.5B (pengzhangzhi/Open-dLLM): Qwen2.5-Coder-0.5B trained as a masked diffusion
# model. Its config says "model_type": "qwen2" (configs/pretrain/qwen2_5_coder_500M.yaml starts
# from Qwen/Qwen2.5-Coder-0.5B) and the training script adds the mask token "<M>"
# (tasks/train_torch.py: `tokenizer.add_special_tokens({"mask_token": "<M>"})`). Logits are
# shifted (veomni/models/transformers/qwen2/generation_utils.py: "Shift logits to predict the
# next token"). Infill layout: prefix, masks, suffix with no eos (eval/eval_infill/
# eval_infill.py: `p + [mask_token_id] * m + tokenizer.encode(s, add_special_tokens=False)`).
# Detected when a "qwen2" checkpoint's tokenizer holds "<M>"; otherwise pass --family.
OPEN_DCODER = dataclasses.replace(
    DREAM,
    name="open-dcoder",
    mask_token="<M>",
    model_types=("qwen2",),
    detect_tokens=("<M>",),
)

# LLaDA-8B-Base / -Instruct (ML-GSAI/LLaDA): OLMo-style weight names (config.json: "model_type":
# "llada", "d_model", "n_layers", "mlp_hidden_size", "embedding_size": 126464), renamed onto
# LlamaForCausalLM; logits not shifted. The mask is id 126336 <|mdm_mask|> (generate.py
# `mask_id=126336`), the answer is padded with <|endoftext|> 126081 and a chat turn ends at
# <|eot_id|> 126348 (generate.py `logits[:, :, 126081]`, `126348`; GUIDELINES.md shows
# `<BOS>...<EOS><EOS>`). Every prompt starts with <|startoftext|> (the tokenizer adds it;
# GUIDELINES.md `<BOS><start_id>user...`), so the layout is <|startoftext|> prefix masks suffix.
LLADA = Family(
    name="llada",
    architecture="llama",
    mask_token="<|mdm_mask|>",
    end_of_hole_token="<|endoftext|>",
    bos_token="<|startoftext|>",
    eos_token=None,
    shifted_logits=False,
    always_bos=True,
    model_types=("llada", "LLaDA"),
    extra_end_tokens=("<|eot_id|>",),
    weight_renames=(
        (r"^model\.transformer\.wte\.", "model.embed_tokens."),
        (r"^model\.transformer\.ln_f\.", "model.norm."),
        (r"^model\.transformer\.ff_out\.", "lm_head."),
        (r"^model\.transformer\.blocks\.(\d+)\.q_proj\.", r"model.layers.\1.self_attn.q_proj."),
        (r"^model\.transformer\.blocks\.(\d+)\.k_proj\.", r"model.layers.\1.self_attn.k_proj."),
        (r"^model\.transformer\.blocks\.(\d+)\.v_proj\.", r"model.layers.\1.self_attn.v_proj."),
        (r"^model\.transformer\.blocks\.(\d+)\.attn_out\.", r"model.layers.\1.self_attn.o_proj."),
        (r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.", r"model.layers.\1.mlp.gate_proj."),
        (r"^model\.transformer\.blocks\.(\d+)\.up_proj\.", r"model.layers.\1.mlp.up_proj."),
        (r"^model\.transformer\.blocks\.(\d+)\.ff_out\.", r"model.layers.\1.mlp.down_proj."),
        (r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
        (
            r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.",
            r"model.layers.\1.post_attention_layernorm.",
        ),
    ),
)

# Prompt layouts: "canvas" puts the masks between prefix and suffix; "suffix-first" (SPM) is
# <fim_suffix> S <fim_prefix> P <fim_middle> masks, the hole last; "prefix-only" is the text
# before the hole and the hole (the suffix is not shown: a family with no known FIM training).
FIM_LAYOUTS = ("canvas", "suffix-first", "prefix-only")

# Stable-DiffCoder-8B-Base / -Instruct (ByteDance-Seed/Stable-DiffCoder, MIT): the Seed-Coder-8B
# network and tokenizer, trained further as a block-diffusion model. config.json: "model_type":
# "llama", "architectures": ["StableDiffcoderForCausalLM"] (a LlamaForCausalLM subclass that only
# adds `generate_block`), plain Llama weight names, "bos_token_id": 0, "eos_token_id": 2,
# "vocab_size": 155136. Its sampler (modeling_stable_diffcoder.py `generate_block`, the card's
# usage: `block_length=4`, `remasking='low_confidence'`, `shift=False`, `threshold` None or 0.95,
# `eos_id=tokenizer.eos_token_id`) denoises blocks of 4 with `mask_id=5` <[MASK_TOKEN]> under a
# block-causal mask (`_make_block_causal_mask`: kron(tril(blocks), ones(4, 4))). No source of the
# model mentions FIM; Seed-Coder's report (section 2.2) trained it suffix-first:
# <[fim-suffix]> SUFFIX <[fim-prefix]> PREFIX <[fim-middle]> MIDDLE, as Zed's Zeta 2 prompts
# Seed-Coder-8B. The answer ends at eos <[end▁of▁sentence]>. Detected as a "llama" checkpoint
# whose tokenizer holds <[MASK_TOKEN]>, or whose architectures name StableDiffcoderForCausalLM.
STABLE_DIFFCODER = Family(
    name="stable-diffcoder",
    architecture="llama",
    mask_token="<[MASK_TOKEN]>",
    end_of_hole_token="<[end\u2581of\u2581sentence]>",
    bos_token=None,
    eos_token=None,
    shifted_logits=False,
    model_types=("llama",),
    detect_tokens=("<[MASK_TOKEN]>",),
    detect_architectures=("StableDiffcoderForCausalLM",),
    block_length=4,
    threshold=0.95,  # the card's `threshold=0.95` (None, its other setting, is one token a step)
    fim_layout="suffix-first",
    fim_prefix_token="<[fim-prefix]>",
    fim_suffix_token="<[fim-suffix]>",
    fim_middle_token="<[fim-middle]>",
)

# Fast-dLLM v2 7B / 1.5B (NVlabs, Apache-2.0; Efficient-Large-Model/Fast_dLLM_v2_7B, _1.5B):
# Qwen2.5-7B-Instruct / -1.5B-Instruct fine-tuned (~1B tokens) into a block-diffusion model.
# config.json: "model_type": "Fast_dLLM_Qwen", "architectures": ["Fast_dLLM_QwenForCausalLM"]
# (remote code whose weights are Qwen2's under Qwen2's names), "bd_size": 32. Its modeling.py
# `generate`: `mask_id=151665` (the added token |<MASK>|), `stop_token=151645` (<|im_end|>),
# `block_size=32`, `small_block_size=8`, `threshold` (the card's demo: 0.9; default 1), greedy;
# attention block-causal at inference (`eval_block_diff_mask`: q // 32 >= k // 32); logits
# shifted inside a block (`torch.cat([logits[:, :1], logits[:, :-1]])`). Its answer ends at
# <|im_end|> (a chat model) or <|endoftext|>. No Fast-dLLM v2 source mentions infilling: the
# Qwen2.5 tokenizer holds Qwen2.5-Coder's FIM tokens, but whether Fast-dLLM v2's base was
# trained with them is unknown, so the layout is the plain text before the hole ("prefix-only":
# a block-diffusion model denoises after its prompt, and nothing is put after the hole).
FAST_DLLM_V2 = Family(
    name="fast-dllm-v2",
    architecture="qwen2",
    mask_token="|<MASK>|",
    end_of_hole_token="<|im_end|>",
    bos_token=None,
    eos_token=None,
    shifted_logits=True,
    model_types=("Fast_dLLM_Qwen",),
    detect_tokens=("|<MASK>|",),
    detect_architectures=("Fast_dLLM_QwenForCausalLM",),
    extra_end_tokens=("<|endoftext|>",),
    block_length=32,
    sub_block_length=8,
    block_stop="settled",
    threshold=0.9,  # the card's demo
    fim_layout="prefix-only",
)

# Detection tries families in this order: variants with marker tokens before their base.
FAMILIES: dict[str, Family] = {
    f.name: f for f in (DEFAULT, DREAMON, DIFFUCODER, DREAM, OPEN_DCODER, LLADA,
                        STABLE_DIFFCODER, FAST_DLLM_V2)
}

# Family fields a config.json block or --family-override may set, and how to read a string.
TOKEN_FIELDS = ("mask_token", "end_of_hole_token", "bos_token", "eos_token", "pad_token",
                "expand_token", "delete_token")
OPTIONAL_TOKEN_FIELDS = ("bos_token", "eos_token", "pad_token", "expand_token", "delete_token")
TUPLE_FIELDS = ("extra_end_tokens",)
BOOL_FIELDS = ("shifted_logits", "always_bos", "delete_pads_right")
OVERRIDABLE = TOKEN_FIELDS + TUPLE_FIELDS + BOOL_FIELDS
NONE_VALUES = ("", "none", "null")
TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")


def get_family(name: str) -> Family:
    """The family called `name`; raises with the list of known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown model family {name!r}; known families: {known}") from None


def _field_value(key: str, value: object) -> object:
    """An override's value as the Family field wants it (strings from a command line too)."""
    if key in BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE_VALUES or text in FALSE_VALUES:
            return text in TRUE_VALUES
        raise ValueError(f"family override {key} wants true or false, got {value!r}")
    if key in TUPLE_FIELDS:
        if isinstance(value, (list, tuple)):
            return tuple(str(v) for v in value)
        return tuple(t for t in (s.strip() for s in str(value).split(",")) if t)
    if value is None or (key in OPTIONAL_TOKEN_FIELDS and str(value).lower() in NONE_VALUES):
        if key not in OPTIONAL_TOKEN_FIELDS:
            raise ValueError(f"family override {key} needs a token string")
        return None
    return str(value)


def apply_overrides(family: Family, overrides: Mapping[str, object]) -> Family:
    """`family` with some fields replaced; unknown keys raise with the list of known ones."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"unknown family override {', '.join(unknown)}; known: {', '.join(OVERRIDABLE)}"
        )
    if not overrides:
        return family
    return dataclasses.replace(
        family, **{key: _field_value(key, value) for key, value in overrides.items()}
    )


def parse_override(text: str) -> tuple[str, str]:
    """`KEY=VALUE` (a --family-override argument) as a pair; the key is checked later."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"family override {text!r} is not KEY=VALUE "
                         f"(keys: {', '.join(OVERRIDABLE)})")
    return key.strip(), value


def parse_overrides(items: Iterable[str] | None) -> dict[str, str]:
    """Repeated `--family-override KEY=VALUE` arguments as one dict, keys checked."""
    overrides = dict(parse_override(item) for item in items or ())
    apply_overrides(DEFAULT, overrides)  # raises on an unknown key or a bad value
    return overrides


def config_block(config: Mapping) -> dict:
    """The `diffusion_lsp` block of a config.json (family name and overrides), checked."""
    block = config.get(CONFIG_BLOCK) or {}
    if not isinstance(block, Mapping):
        raise ValueError(f"config.json's {CONFIG_BLOCK!r} must be an object, got {block!r}")
    block = dict(block)
    if LEGACY_CONFIG_KEY in config and FAMILY_KEY not in block:
        block[FAMILY_KEY] = config[LEGACY_CONFIG_KEY]
    return block


def detect_family(config: Mapping, tokens: Iterable[str] = ()) -> Family:
    """The family of a checkpoint: the config's explicit name first, then the first family
    whose model_type and marker tokens (in the tokenizer's `tokens`) match."""
    explicit = config_block(config).get(FAMILY_KEY)
    if explicit:
        return get_family(explicit)
    tokens = set(tokens)
    for family in FAMILIES.values():
        if family.matches(config, tokens):
            return family
    model_type = str(config.get("model_type", ""))
    known = ", ".join(sorted({t for f in FAMILIES.values() for t in f.model_types}))
    raise ValueError(
        f"cannot tell the model family from model_type={model_type!r}; pass --family "
        f"({', '.join(sorted(FAMILIES))}) or set {{\"{CONFIG_BLOCK}\": {{\"family\": ...}}}} "
        f"in config.json (recognised model_type values: {known})"
    )


def resolve_family(
    config: Mapping,
    tokens: Iterable[str],
    name: str | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Family:
    """The family a checkpoint is run as: `name` (e.g. --family) or the config's block or
    detection, then the config block's overrides, then `overrides` (e.g. the command line)."""
    block = config_block(config)
    family = get_family(name) if name else detect_family(config, tokens)
    from_config = {k: v for k, v in block.items() if k != FAMILY_KEY}
    family = apply_overrides(family, from_config)
    return apply_overrides(family, dict(overrides or {}))
