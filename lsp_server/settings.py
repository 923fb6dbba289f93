"""The server's settings: one msgspec tree, camelCase on the wire.

Editors send it as `initializationOptions` and in `workspace/didChangeConfiguration`
(`{"settings": {"diffusionLsp": {...}}}` or the tree itself). A partial tree updates only the
keys it names. A value of the wrong type or out of range is reported once and ignored: the
previous value stays.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

import msgspec

from diffusion_contract.options import (
    COMMIT_SETTINGS,
    SAMPLER_SETTINGS,
    settings_problem,
    settings_struct,
)
from model.network.families import OVERRIDABLE

SECTION = "diffusionLsp"


class ModelSettings(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    path: str | None = None  # model directory or HF cache name; None = the bundled model
    # a name in model.network.families.FAMILIES; None = config.json / detect
    family: str | None = None
    # family fields to replace, e.g. {"mask_token": "<M>"} (model.network.families.OVERRIDABLE)
    family_overrides: dict[str, str] = msgspec.field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # the transformer's linear weights (model/network/quantize.py): none (the checkpoint's dtype),
    # int8, int4, auto (the device's best that fits)
    quantization: Literal["none", "int8", "int4", "auto"] = "auto"
    threads: int | None = None  # torch CPU threads; None = torch's choice
    # documents whose context (keys/values) is kept across completions; 0 = off
    context_cache_documents: int = 20


# The sampler's settings as InfillOptions declares them (diffusion_contract/options.py), camelCase
# here: how many positions a step commits, and the reference samplers' (Dream, LLaDA;
# docs/models.md, "Sampler settings", maps each model card's values onto these).
CommitSettings = settings_struct("CommitSettings", COMMIT_SETTINGS, rename="camel",
                                 forbid_unknown_fields=True, module=__name__)
SamplerSettings = settings_struct("SamplerSettings", SAMPLER_SETTINGS, rename="camel",
                                  forbid_unknown_fields=True, module=__name__)


class CompletionSettings(CommitSettings, rename="camel", forbid_unknown_fields=True):
    """threshold and tokensPerStep (CommitSettings), then these."""

    # None: the threshold the model's card runs with (Stable-DiffCoder: 0.95), else the
    # sampler's 0.9 (`Family.threshold`)
    threshold: float | None = None

    max_tokens: int = 64  # tokens in a multi-line completion, at most
    max_tokens_single_line: int = 32
    max_lines: int = 12  # lines in a multi-line completion, at most
    multiline: Literal["auto", "always", "never"] = "auto"
    debounce_ms: int = 10  # wait this long for the user to type on before starting
    stop: list[str] = msgspec.field(default_factory=list)
    # send `diffusion/preview` notifications while a hole denoises (docs/editor-features.md)
    preview: bool = False
    sampler: SamplerSettings = msgspec.field(default_factory=SamplerSettings)
    # offer nothing whose least sure token was committed below this probability (the model's
    # own confidence); None = the model's calibrated floor (docs/benchmarks.md), 0 = off
    min_confidence: float | None = None
    # offer nothing that turns a file that parsed into one that does not (lsp_server/parse_check)
    check_parse: bool = True


class HolesSettings(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """The "Fill N holes" code action (lsp_server/holes.py)."""

    patterns: list[str] = msgspec.field(default_factory=list)  # more markers (regexes)
    max_tokens: int = 32  # each hole's budget of tokens
    max_holes: int = 8  # a range with more markers offers no action


class ContextSettings(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    prefix_tokens: int = 640  # budget for the text before the cursor
    suffix_tokens: int = 192  # budget for the text after the cursor
    snippet_tokens: int = 128  # budget for snippets from other open documents, in all
    max_snippets: int = 2
    snippet_lines: int = 16  # lines per snippet


class NextEditSettings(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """`textDocument/copilotInlineEdit` (docs/next-edits.md)."""

    enable: bool = True
    lines_above: int = 4  # the editable region: lines above the cursor's line ...
    lines_below: int = 8  # ... and below it
    region_tokens: int = 200  # the region shrinks to this many tokens
    max_snippets: int = 4  # recently viewed snippets sent (Inception: 3-5)
    snippet_lines: int = 20
    history_edits: int = 5  # diffs sent, the latest
    # the local rewrite (model/decoding/next_edit.py); "region" by measurement (docs/next-edits.md)
    strategy: Literal["doubt", "region"] = "region"
    threshold: float | None = None  # None: the model card's, as completion.threshold
    # after empty answers, skip more and more requests before asking the model again
    # (next_edit.Backoff); false: ask on every request (the next-edit benchmark measures each)
    backoff: bool = True


class RemoteSettings(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    url: str = "http://127.0.0.1:8000"  # base URL; the API path is added
    # /v1/fim/completions, /v1/completions, or Inception's contract on any URL ("mercury": no
    # /health probe, model mercury-edit-2 by default; FIM at /v1/fim/completions). Next edits
    # always go to /v1/edit/completions, which Mercury and our service both answer.
    api: Literal["fim", "completions", "mercury"] = "fim"
    model: str = "diffusion-lsp"
    api_key_env: str = "DIFFUSION_LSP_TOKEN"  # environment variable holding the key
    api_key: str | None = None  # or the key itself (never logged)
    timeout_ms: int = 5000
    retries: int = 2

    def __repr__(self) -> str:  # the key never reaches a log line, even with the settings
        key = "None" if self.api_key is None else "'***'"
        return (f"RemoteSettings(url={self.url!r}, api={self.api!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, api_key={key}, "
                f"timeout_ms={self.timeout_ms}, retries={self.retries})")


class Settings(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    enable: bool = True
    disabled_languages: list[str] = msgspec.field(default_factory=list)
    backend: Literal["local", "remote"] = "local"
    model: ModelSettings = msgspec.field(default_factory=ModelSettings)
    completion: CompletionSettings = msgspec.field(default_factory=CompletionSettings)
    context: ContextSettings = msgspec.field(default_factory=ContextSettings)
    remote: RemoteSettings = msgspec.field(default_factory=RemoteSettings)
    holes: HolesSettings = msgspec.field(default_factory=HolesSettings)
    next_edit: NextEditSettings = msgspec.field(default_factory=NextEditSettings)
    cache_size: int = 256  # completions kept for type-along reuse
    log_level: Literal["error", "warning", "info", "debug"] = "info"

    def enabled_for(self, language_id: str | None) -> bool:
        return self.enable and (language_id or "") not in self.disabled_languages


POSITIVE = {
    ("completion", "max_tokens"), ("completion", "max_tokens_single_line"),
    ("completion", "max_lines"), ("context", "max_snippets"), ("context", "snippet_lines"),
    ("context", "prefix_tokens"), ("remote", "timeout_ms"), ("cache_size",),
    ("holes", "max_tokens"), ("holes", "max_holes"),
    ("next_edit", "region_tokens"), ("next_edit", "snippet_lines"),
}
NON_NEGATIVE = {
    ("completion", "debounce_ms"), ("context", "suffix_tokens"), ("context", "snippet_tokens"),
    ("remote", "retries"), ("model", "context_cache_documents"),
    ("next_edit", "lines_above"), ("next_edit", "lines_below"), ("next_edit", "max_snippets"),
    ("next_edit", "history_edits"),
}


def _camel(path: tuple[str, ...]) -> str:
    def one(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(part.title() for part in rest)

    return ".".join(one(name) for name in path)


def _check_ranges(settings: Settings) -> list[str]:
    problems = []

    def value(path: tuple[str, ...]) -> Any:
        node: Any = settings
        for name in path:
            node = getattr(node, name)
        return node

    for path in POSITIVE:
        if value(path) <= 0:
            problems.append(f"{_camel(path)} must be positive")
    for path in NON_NEGATIVE:
        if value(path) < 0:
            problems.append(f"{_camel(path)} must not be negative")
    if settings.next_edit.threshold is not None and \
            not 0.0 <= settings.next_edit.threshold <= 1.0:
        problems.append("nextEdit.threshold must lie in [0, 1]")
    floor = settings.completion.min_confidence
    if floor is not None and not 0.0 <= floor <= 1.0:
        problems.append("completion.minConfidence must lie in [0, 1]")
    unknown = sorted(set(settings.model.family_overrides) - set(OVERRIDABLE))
    if unknown:
        problems.append(f"model.familyOverrides: unknown {', '.join(unknown)}; "
                        f"known: {', '.join(OVERRIDABLE)}")
    if settings.model.threads is not None and settings.model.threads <= 0:
        problems.append("model.threads must be positive")
    for pattern in settings.holes.patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            problems.append(f"holes.patterns: {pattern!r} is not a regular expression "
                            f"({error})")
    problems.extend(_sampler_problems(settings.completion))
    return problems


def _sampler_problems(completion: CompletionSettings) -> list[str]:
    """What the sampler refuses in the completion settings, checked by the sampler itself
    (diffusion_contract.options.settings_problem), with the settings' camelCase names."""
    given = {**msgspec.structs.asdict(completion.sampler),
             "threshold": completion.threshold, "tokens_per_step": completion.tokens_per_step}
    for max_tokens in (completion.max_tokens, completion.max_tokens_single_line):
        problem = settings_problem(max_tokens, **given) if max_tokens > 0 else None
        if problem is not None:  # the names as the settings spell them (not in a quote)
            said, quote = problem.partition(" (")[::2]
            for name in ("max_tokens", *given):
                said = re.sub(rf"\b{name}\b", _camel((name,)), said)
            return [f"completion: {said}{' (' + quote if quote else ''} "
                    f"(maxTokens {max_tokens})"]
    return []


def unwrap(raw: Any) -> Any:
    """The settings tree inside a didChangeConfiguration / initializationOptions payload."""
    if isinstance(raw, dict) and SECTION in raw:
        return raw[SECTION]
    return raw


def _leaves(raw: dict, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, value) of every leaf of a nested settings payload; sections recurse."""
    leaves = []
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            leaves.extend(_leaves(value, (*path, key)))
        else:
            leaves.append(((*path, key), value))
    return leaves


def _with_leaf(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    inner = tree.get(path[0])
    return {**tree, path[0]: _with_leaf(inner if isinstance(inner, dict) else {}, path[1:], value)}


def _known_values(path: tuple[str, ...]) -> str:
    """"; known: a, b, c" for a setting whose values are a fixed list (a Literal), else ""."""
    node: Any = Settings
    for name in path:
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(node)}
        node = fields.get(name)
        if node is None:
            return ""
    if typing.get_origin(node) is not Literal:
        return ""
    return "; known: " + ", ".join(map(str, typing.get_args(node)))


def merge(current: Settings, raw: Any) -> tuple[Settings, list[str]]:
    """`current` updated by the (partial) tree `raw`, leaf by leaf; a bad leaf is left out
    and described in the returned problems, its siblings still apply."""
    raw = unwrap(raw)
    if raw is None:
        return current, []
    if not isinstance(raw, dict):
        return current, [f"settings must be an object, got {type(raw).__name__}"]
    tree = msgspec.to_builtins(current)
    settings = current
    problems: list[str] = []
    for path, value in _leaves(raw):
        name = ".".join(path)
        candidate = _with_leaf(tree, path, value)
        try:
            decoded = msgspec.convert(candidate, Settings)
        except msgspec.ValidationError as error:
            problems.append(f"{name}: {error}{_known_values(path)}")
            continue
        issues = _check_ranges(decoded)
        if issues:
            problems.extend(issues)
            continue
        tree, settings = candidate, decoded
    return settings, problems


def describe() -> dict:
    """Every setting with its default, as docs/server.md documents it."""
    return msgspec.to_builtins(Settings())
