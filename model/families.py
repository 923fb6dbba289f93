"""Model families as data: what differs between diffusion code models.

One sampler serves every family. A family says which special tokens mean "mask" and
"end of hole", whether the network's logits are shifted (Dream: position i predicts
token i+1, inherited from the autoregressive model it was adapted from) or not (LLaDA,
and the bundled model), how prefix / hole / suffix are laid out, and how the checkpoint's
weights map onto a stock transformers class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """Everything the loader and sampler need to know about one model family."""

    name: str
    architecture: str  # "qwen2" | "llama": the stock transformers class the weights load into
    mask_token: str  # the [MASK] a hole starts as
    end_of_hole_token: str  # a hole position decoding to this means "no more text here"
    bos_token: str | None  # put before the prefix (always for `default`; when needed for shifted)
    eos_token: str | None  # put after the suffix
    shifted_logits: bool  # True: logits at position i predict token i+1 (Dream)
    always_bos: bool = False  # put bos_token first even when the prefix is not empty
    # (pattern, replacement) pairs applied with re.sub, in order, to every weight name
    weight_renames: tuple[tuple[str, str], ...] = ()
    # config.json keys that say "this checkpoint is this family"
    model_types: tuple[str, ...] = ()
    extra_end_tokens: tuple[str, ...] = field(default=())  # also end the hole (e.g. <|im_end|>)

    def rename_weight(self, name: str) -> str:
        for pattern, replacement in self.weight_renames:
            name = re.sub(pattern, replacement, name)
        return name


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

# Dream-Coder-v0-7B, DiffuCoder-7B, DreamOn-v0-7B, Open-dCoder-0.5B: Qwen2 weight names,
# adapted from Qwen2.5(-Coder), so the logits keep the autoregressive shift.
DREAM = Family(
    name="dream",
    architecture="qwen2",
    mask_token="<|mask|>",
    end_of_hole_token="<|endoftext|>",
    bos_token="<|endoftext|>",
    eos_token=None,
    shifted_logits=True,
    model_types=("Dream", "dream", "dreamon", "DreamOn"),
    extra_end_tokens=("<|im_end|>",),
)

# LLaDA-8B: OLMo-style weight names, renamed onto LlamaForCausalLM; logits not shifted.
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

FAMILIES: dict[str, Family] = {f.name: f for f in (DEFAULT, DREAM, LLADA)}


def get_family(name: str) -> Family:
    """The family called `name`; raises with the list of known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown model family {name!r}; known families: {known}") from None


def detect_family(config: dict) -> Family:
    """Guess the family from a checkpoint's config.json (explicit key first, then model_type)."""
    explicit = config.get("diffusion_lsp_family")
    if explicit:
        return get_family(explicit)
    model_type = str(config.get("model_type", ""))
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(
        f"cannot tell the model family from model_type={model_type!r}; pass --family "
        f"({', '.join(sorted(FAMILIES))}) or set 'diffusion_lsp_family' in config.json "
        f"(recognised model_type values: {known})"
    )
