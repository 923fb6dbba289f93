"""Load a diffusion code model: tokenizer + safetensors weights into a stock transformers class.

No `trust_remote_code`, no hub calls: a model is a local directory, or a name whose files are
already in the Hugging Face cache. Attention is made bidirectional with stock transformers
(`config.is_causal = False`, and every attention module's `is_causal` switched off so that
SDPA never falls back to its causal kernel).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model.catalog.cpu import auto_cpu_dtype
from model.catalog.paths import (  # noqa: F401 - where a model is found (torch-free), re-exported
    BUNDLED_DIR,
    CONFIG_FILE,
    MIN_CONFIDENCE_KEY,
    TOKENIZER_FILE,
    WEIGHTS_GLOB,
    ModelLoadError,
    bundled_model_path,
    hf_cache_snapshot,
    hf_hub_dir,
    resolve_model_path,
)
from model.network import quantize
from model.network.families import Family, resolve_family
from model.network.tokenizer import BPE_MERGES_FILE, BPE_VOCAB_FILE, qwen2_tokenizer_from_bpe_files

log = logging.getLogger(__name__)
# config.json keys that describe where the checkpoint came from, not its shape
NON_SHAPE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "dtype",
                  "diffusion_lsp", "diffusion_lsp_family", MIN_CONFIDENCE_KEY)


@dataclass(frozen=True)
class FimIds:
    """The three FIM tokens of a family with a FIM layout."""

    prefix: int
    suffix: int
    middle: int


@dataclass
class SpecialIds:
    """Token ids the sampler needs, resolved once from the tokenizer."""

    mask: int
    end_of_hole: int
    bos: int | None
    eos: int | None
    pad: int  # fills batch padding (never attended to)
    extra_end: tuple[int, ...]  # also end the hole: the family's extra ends and its pad token
    newline: int | None = None  # the id of "\n" when it is a token of its own (ends a line)
    hole_pad: int | None = None  # "nothing here" (DiffuCoder's <|dlm_pad|>); also in extra_end
    expand: int | None = None  # committed: becomes two masks (DreamOn)
    delete: int | None = None  # committed: the position disappears (DreamOn)
    fim: FimIds | None = None  # the FIM tokens (a family with a FIM layout)

    @property
    def ends(self) -> frozenset[int]:
        """Every id that ends the hole."""
        return frozenset((self.end_of_hole, *self.extra_end))

    @property
    def hole_edits(self) -> frozenset[int]:
        """Ids that change the hole's length when committed (DreamOn's expand / delete)."""
        return frozenset(i for i in (self.expand, self.delete) if i is not None)


@dataclass
class LoadedModel:
    """A ready-to-run model: the network, its tokenizer, family and special token ids."""

    network: torch.nn.Module
    tokenizer: Tokenizer
    family: Family
    ids: SpecialIds
    device: torch.device
    dtype: torch.dtype
    path: Path
    # (V,) bool: ids that may never be sampled (special/added tokens that neither end the hole
    # nor edit it, and ids the tokenizer does not know); computed from the tokenizer when None
    never_sample: torch.Tensor | None = None
    # (k,) the same ids as a list, for an in-place fill that touches k columns, not V
    never_sample_ids: torch.Tensor = field(init=False)
    # what `never_sample_on` and `blank_ids` computed: never-sampled ids per device, and the
    # ids that decode to blank space (made on first use, never changed after)
    _on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False,
                                                          repr=False)
    _blank_ids: torch.Tensor | None = field(default=None, init=False, repr=False)
    # how the decoder layers' weights are stored (model.network.quantize): none | int8 | int4, and
    # the line to say once where that is not what was asked (no kernel here, or auto's choice)
    quantization: str = quantize.NONE
    quantization_notice: str | None = None

    def __post_init__(self) -> None:
        if self.never_sample is None:
            self.never_sample = never_sampled_ids(self.tokenizer, self.ids, self.vocab_size)
        self.never_sample_ids = self.never_sample.nonzero().squeeze(-1)

    @property
    def vocab_size(self) -> int:
        return int(self.network.config.vocab_size)

    def never_sample_on(self, device: torch.device) -> torch.Tensor:
        """`never_sample_ids` on `device` (logits on a GPU are banned there), copied once."""
        if device == self.never_sample_ids.device:
            return self.never_sample_ids
        if device not in self._on_device:
            self._on_device[device] = self.never_sample_ids.to(device)
        return self._on_device[device]

    def blank_ids(self) -> torch.Tensor:
        """(k,) ids of the tokens that decode to blank space only (none of them an end)."""
        if self._blank_ids is None:
            decode, ends = self.tokenizer.decode, self.ids.ends
            self._blank_ids = torch.tensor(
                [i for i in range(self.tokenizer.get_vocab_size())
                 if not decode([i], skip_special_tokens=False).strip() and i not in ends],
                dtype=torch.long)
        return self._blank_ids


def pick_device(device: str = "auto") -> torch.device:
    """`auto` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; known: auto, cpu, cuda, cuda:N")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(dtype: str, device: torch.device, parameters: int = 0) -> torch.dtype:
    """`auto` means bf16 on CUDA; on a CPU, what measured fastest there for a model of
    `parameters` parameters (`model.catalog.cpu.auto_cpu_dtype`: bf16 for large models on CPUs with
    native bf16, fp32 otherwise)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return auto_cpu_dtype(parameters)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_config(raw: dict, family: Family) -> Qwen2Config | LlamaConfig:
    """A stock transformers config from a checkpoint's config.json."""
    if family.architecture == "qwen2":
        fields = {k: v for k, v in raw.items() if k not in NON_SHAPE_KEYS}
        config = Qwen2Config(**fields)
    elif family.architecture == "llama":
        config = _llama_config_from_olmo(raw) if "d_model" in raw else LlamaConfig(**{
            k: v for k, v in raw.items() if k not in NON_SHAPE_KEYS
        })
    else:
        raise ValueError(f"unknown architecture {family.architecture!r}; known: qwen2, llama")
    config.is_causal = False
    config.use_cache = False
    return config


def _llama_config_from_olmo(raw: dict) -> LlamaConfig:
    """LLaDA's OLMo-style config.json expressed as a LlamaConfig."""
    vocab = raw.get("embedding_size") or raw["vocab_size"]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=raw["d_model"],
        intermediate_size=raw["mlp_hidden_size"],
        num_hidden_layers=raw["n_layers"],
        num_attention_heads=raw["n_heads"],
        num_key_value_heads=raw.get("n_kv_heads") or raw["n_heads"],
        max_position_embeddings=raw.get("max_sequence_length", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=raw.get("rope_theta", 500000.0),
        attention_bias=bool(raw.get("include_bias", False)),
        tie_word_embeddings=bool(raw.get("weight_tying", False)),
        hidden_act="silu",
    )


def make_bidirectional(network: torch.nn.Module) -> None:
    """Switch every attention module to full (non-causal) attention."""
    network.config.is_causal = False
    for module in network.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


def load_state_dict(path: Path, family: Family) -> dict[str, torch.Tensor]:
    """All safetensors shards in `path`, with names renamed onto the stock class."""
    files = sorted(path.glob(WEIGHTS_GLOB))
    if not files:
        raise ModelLoadError(f"no weights in {path}: expected {WEIGHTS_GLOB} files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            shard = load_file(str(file))
        except Exception as exc:  # corrupt or truncated file
            raise ModelLoadError(f"cannot read weights {file}: {exc}") from exc
        for name, tensor in shard.items():
            state[family.rename_weight(name)] = tensor
    return state


def check_shapes(network: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights whose shapes differ from what config.json builds, naming the first one
    (torch would list every mismatched tensor, several hundred lines for a 7B model)."""
    expected = dict(network.named_parameters())
    wrong = [(name, tuple(tensor.shape), tuple(expected[name].shape))
             for name, tensor in state.items()
             if name in expected and tensor.shape != expected[name].shape]
    if wrong:
        name, found, wanted = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise ModelLoadError(
            f"weights in {path} do not fit {CONFIG_FILE}: {name} is {list(found)} in the "
            f"checkpoint but {list(wanted)} by {CONFIG_FILE}{more}")


def resolve_special_ids(tokenizer: Tokenizer, family: Family, path: Path) -> SpecialIds:
    def need(token: str) -> int:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelLoadError(
                f"tokenizer in {path} lacks the {family.name} family's special token {token!r}"
            )
        return token_id

    def maybe(token: str | None) -> int | None:
        return None if token is None else tokenizer.token_to_id(token)

    end = need(family.end_of_hole_token)
    hole_pad = None if family.pad_token is None else need(family.pad_token)
    extra = tuple(i for i in (maybe(t) for t in family.extra_end_tokens) if i is not None)
    if hole_pad is not None and hole_pad != end and hole_pad not in extra:
        extra = (*extra, hole_pad)
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    return SpecialIds(
        mask=need(family.mask_token),
        end_of_hole=end,
        bos=maybe(family.bos_token),
        eos=maybe(family.eos_token),
        pad=end,
        extra_end=extra,
        newline=newline[0] if len(newline) == 1 else None,
        hole_pad=hole_pad,
        expand=None if family.expand_token is None else need(family.expand_token),
        delete=None if family.delete_token is None else need(family.delete_token),
        fim=fim_ids(tokenizer, family),
    )


def fim_ids(tokenizer: Tokenizer, family: Family) -> FimIds | None:
    """The family's FIM tokens in this tokenizer; None when it has no FIM layout or lacks one
    of them (then only prompts without a suffix run: `model.decoding.hole.layout_ids` says so)."""
    if family.fim_layout == "canvas":
        return None
    found = [tokenizer.token_to_id(t) if t else None for t in
             (family.fim_prefix_token, family.fim_suffix_token, family.fim_middle_token)]
    return None if None in found else FimIds(*found)


def never_sampled_ids(tokenizer: Tokenizer, ids: SpecialIds, vocab_size: int) -> torch.Tensor:
    """(V,) bool: the ids a completion may never contain.

    Every added / special token of the tokenizer (Qwen2's <|image_pad|>, <tool_call>,
    <|repo_name|>, ...: several are not even flagged "special", so decoding would keep them)
    and every id the tokenizer has no token for (LLaDA pads its vocabulary to 126464 rows),
    except the ids that end the hole and DreamOn's expand / delete, which the sampler acts on.
    The mask token itself is an added token: it is never sampled either.
    """
    banned = torch.ones(vocab_size, dtype=torch.bool)
    known = [i for i in tokenizer.get_vocab(with_added_tokens=True).values() if i < vocab_size]
    banned[torch.tensor(known, dtype=torch.long)] = False
    added = [i for i in tokenizer.get_added_tokens_decoder() if i < vocab_size]
    banned[torch.tensor(added, dtype=torch.long)] = True
    allowed = [i for i in (*ids.ends, *ids.hole_edits) if i < vocab_size]
    banned[torch.tensor(allowed, dtype=torch.long)] = False
    return banned


def load_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.json, or else the Qwen2 BPE in vocab.json + merges.txt (how Dream-Coder,
    DiffuCoder and DreamOn publish their tokenizer)."""
    if (path / TOKENIZER_FILE).exists():
        try:
            return Tokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as exc:  # tokenizers raises plain Exception on unreadable files
            raise ModelLoadError(f"cannot read the tokenizer {path / TOKENIZER_FILE}: {exc}"
                                 ) from exc
    if (path / BPE_VOCAB_FILE).exists() and (path / BPE_MERGES_FILE).exists():
        try:
            return qwen2_tokenizer_from_bpe_files(path)
        except Exception as exc:  # tokenizers raises plain Exception on unreadable files
            raise ModelLoadError(f"cannot build the tokenizer from {BPE_VOCAB_FILE} + "
                                 f"{BPE_MERGES_FILE} in {path}: {exc}") from exc
    raise ModelLoadError(f"no {TOKENIZER_FILE} (nor {BPE_VOCAB_FILE} + {BPE_MERGES_FILE}) in "
                         f"{path}: expected a HF tokenizers file")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    family: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overrides: dict[str, object] | None = None,
    quantization: str = quantize.AUTO,
) -> LoadedModel:
    """Load tokenizer and weights into a bidirectional stock transformers model, ready for eval.

    `family` names the family (else config.json's `diffusion_lsp` block, else detection);
    `overrides` replace family fields (model.network.families.OVERRIDABLE) after the config block's.
    `quantization` (model.network.quantize.CHOICES): the decoder layers' linear weights in 8 or 4
    bits, quantized layer by layer as they stream in (`load_quantized`), or `auto`'s choice.
    """
    quantize.check_choice(quantization)
    path = resolve_model_path(name_or_path)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise ModelLoadError(f"no {CONFIG_FILE} in {path}: not a model directory")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    tokenizer = load_tokenizer(path)
    fam = resolve_family(raw, tokenizer.get_vocab(with_added_tokens=True), family, overrides)
    ids = resolve_special_ids(tokenizer, fam, path)

    try:
        config = build_config(raw, fam)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{config_file} does not describe a {fam.name} model: {exc}") from exc
    config._attn_implementation = "sdpa"
    network_class = Qwen2ForCausalLM if fam.architecture == "qwen2" else LlamaForCausalLM
    with torch.device("meta"):
        network = network_class(config)
    torch_device = pick_device(device)
    parameters = sum(p.numel() for p in network.parameters())
    plan = quantization_plan(quantization, network, torch_device)
    if plan.kernel is not None:
        load_quantized(network, path, fam, torch_device, plan.kernel)
        torch_dtype = plan.kernel.dtype
    else:
        torch_dtype = pick_dtype(dtype, torch_device, parameters)
        state = load_state_dict(path, fam)
        assign_weights(network, state, path, fam)
        network.to(device=torch_device, dtype=torch_dtype)
    network.eval()
    make_bidirectional(network)
    if plan.notice:  # a fallback is a warning; auto's choice is news
        log.log(logging.INFO if plan.asked in (quantize.AUTO, plan.scheme) else logging.WARNING,
                "%s", plan.notice)
    return LoadedModel(network, tokenizer, fam, ids, torch_device, torch_dtype, path,
                       quantization=plan.scheme, quantization_notice=plan.notice)


def quantization_plan(choice: str, network: torch.nn.Module,
                      device: torch.device) -> quantize.Plan:
    """What `choice` means for `network` (on the meta device) on `device`: `auto` by size
    and free memory, else the scheme or the nearest one with a kernel there."""
    try:
        if choice == quantize.AUTO:
            parameters = sum(p.numel() for p in network.parameters())
            return quantize.choose_auto(device, parameters,
                                        quantize.linear_parameter_count(network))
        return quantize.nearest_working(choice, device)
    except quantize.QuantizationError as error:
        raise ModelLoadError(str(error)) from error


def assign_weights(network: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                   fam: Family) -> None:
    """`state` (the checkpoint's tensors, renamed) assigned into `network` (built on the meta
    device), refusing weights that do not fit; ties the head and rebuilds rotary buffers."""
    config = network.config
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    check_shapes(network, state, path)
    result = network.load_state_dict(state, strict=False, assign=True)
    tied = config.tie_word_embeddings
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"weights in {path} do not fit the {fam.name} family's "
            f"{type(network).__name__}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )
    if config.tie_word_embeddings:
        network.tie_weights()
    _materialise_buffers(network, config)


class WeightIndex:
    """Where each tensor of a checkpoint is (its renamed name -> shard file and name in it),
    read one group at a time: a quantized load never holds more than one layer unquantized."""

    def __init__(self, path: Path, fam: Family) -> None:
        self.files = sorted(path.glob(WEIGHTS_GLOB))
        if not self.files:
            raise ModelLoadError(f"no weights in {path}: expected {WEIGHTS_GLOB} files")
        self.where: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as shard:
                    for name in shard.keys():  # noqa: SIM118 - safe_open has no __iter__
                        renamed = fam.rename_weight(name)
                        self.where[renamed] = (file, name)
                        self.shapes[renamed] = tuple(shard.get_slice(name).get_shape())
            except Exception as exc:  # corrupt or truncated file
                raise ModelLoadError(f"cannot read weights {file}: {exc}") from exc

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for file in self.files:
            wanted = [n for n in names if self.where[n][0] == file]
            if not wanted:
                continue
            try:
                with safe_open(str(file), framework="pt") as shard:
                    for name in wanted:
                        out[name] = shard.get_tensor(self.where[name][1])
            except Exception as exc:  # corrupt or truncated file
                raise ModelLoadError(f"cannot read weights {file}: {exc}") from exc
        return out


def load_quantized(network: torch.nn.Module, path: Path, fam: Family, device: torch.device,
                   kernel: quantize.Kernel) -> None:
    """Fill `network` (on the meta device) with the checkpoint's weights, its decoder layers'
    linear weights quantized by `kernel`: from the disk cache (model.network.quantized_cache) where
    a whole copy is there, else streamed -- the embedding, norms and head first (the head
    quantized at once where the kernel says), then one decoder layer at a time read, copied to
    `device` in `kernel.dtype` and quantized before the next is read -- and kept in the cache
    for the next start. Peak memory: the quantized network, one layer's float weights and the
    quantization's temporaries (tests/test_quantize_memory.py measures it)."""
    from model.network import quantized_cache

    index = WeightIndex(path, fam)
    key = quantized_cache.cache_key(
        quantized_cache.checkpoint_fingerprint(path, index.files, path / CONFIG_FILE),
        fam.name, kernel, device.type)
    config = network.config
    network.requires_grad_(False)  # an int8 weight cannot require gradients
    if quantized_cache.load_cached(key, network, device):
        quantize.tie_or_quantize_head(network, kernel)
        _materialise_buffers(network, config)
        network.model.rotary_emb.to(device)  # inv_freq stays float32
        return
    names = [n for n in index.where if not (config.tie_word_embeddings and n == "lm_head.weight")]
    expected = {name for name, _ in network.named_parameters()}
    check_shapes(network, {n: torch.empty(index.shapes[n], device="meta") for n in names
                           if n in expected}, path)
    unexpected = sorted(set(names) - expected)
    missing = sorted(expected - set(names) - ({"lm_head.weight"} if config.tie_word_embeddings
                                              else set()))
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {path} do not fit the {fam.name} family's {type(network).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}")

    def place(group: list[str]) -> dict[str, torch.Tensor]:
        # copies, never views of the shard: safetensors maps the file, and a kept view (a bias,
        # a norm) would keep the whole shard's pages mapped, counted in the process's memory
        return {n: t.to(device=device, dtype=kernel.dtype, copy=True)
                for n, t in index.read(group).items()}

    layer_prefix = "model.layers."
    network.load_state_dict(place([n for n in names if not n.startswith(layer_prefix)]),
                            strict=False, assign=True)
    quantize.tie_or_quantize_head(network, kernel)  # before the layers: its float copy goes
    return_freed_memory()
    for number, layer in enumerate(network.model.layers):
        prefix = f"{layer_prefix}{number}."
        group = place([n for n in names if n.startswith(prefix)])
        layer.load_state_dict({n.removeprefix(prefix): t for n, t in group.items()},
                              strict=True, assign=True)
        del group
        quantize.quantize_module(layer, kernel)
        return_freed_memory()
    _materialise_buffers(network, config)
    network.model.rotary_emb.to(device)  # inv_freq stays float32
    quantized_cache.save_cached(key, network)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand the C allocator's freed pages back to the system. Without it a streamed load's
    freed float layers could stay resident: the same int8 load peaked 127 MiB above its start in
    one run and 472 MiB in the next (glibc kept the freed layers, by chance of where they lay)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _materialise_buffers(network: torch.nn.Module, config) -> None:
    """Rotary buffers were created on the meta device; rebuild them on the CPU."""
    rotary = network.model.rotary_emb
    fresh = type(rotary)(config=config)
    network.model.rotary_emb = fresh


def quantized_copy(model: LoadedModel, scheme: str,
                   kernel: quantize.Kernel | None = None) -> LoadedModel:
    """`model` with its decoder layers' linear weights in `scheme` (the nearest with a kernel
    on its device, or `kernel`), made one part at a time beside it: the same weights in bits,
    for comparisons side by side (benchmarks; tests). Returns `model` itself for `none`."""
    plan = quantize.nearest_working(quantize.check_choice(scheme), model.device)
    if kernel is not None:
        plan = quantize.Plan(scheme, kernel.scheme, kernel)
    if plan.kernel is None:
        return model
    source, dtype = model.network, plan.kernel.dtype
    with torch.device("meta"):
        network = type(source)(source.config)
    network.requires_grad_(False)
    inner = network.model
    names = {id(module): name for name, module in network.named_modules()}
    for part in (inner.embed_tokens, inner.norm, network.lm_head, *inner.layers):
        state = source.get_submodule(names[id(part)]).state_dict()
        part.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
        if part not in (inner.embed_tokens, inner.norm, network.lm_head):
            quantize.quantize_module(part, plan.kernel)
    quantize.tie_or_quantize_head(network, plan.kernel)
    _materialise_buffers(network, network.config)
    inner.rotary_emb.to(model.device)  # inv_freq stays float32
    network.eval()
    make_bidirectional(network)
    return LoadedModel(network, model.tokenizer, model.family, model.ids, model.device, dtype,
                       model.path, never_sample=model.never_sample, quantization=plan.scheme,
                       quantization_notice=plan.notice)
