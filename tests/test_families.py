"""Every published family, from a tiny checkpoint in its official on-disk format: detection,
layout, end / pad / expand / delete behaviour, overrides, and no special token in any
completion."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding.hole import layout_ids
from model.decoding.passes import forward_holes, needs_full_pass
from model.decoding.sampler import apply_step, infill, new_state
from model.network.families import OVERRIDABLE, apply_overrides, get_family, parse_override
from model.network.loader import ModelLoadError, load_model
from model.network.published import FAMILY_SPECS, SPECS, leaking_tokens, write_checkpoint

from .helpers import one_thread  # noqa: F401 - autouse: tiny matmuls on one thread

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
SEEDS = range(16)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    """One checkpoint per published family."""
    root = tmp_path_factory.mktemp("families")
    return {name: write_checkpoint(root / name, name) for name in FAMILY_SPECS}


@pytest.fixture(scope="module")
def family_models(family_dirs) -> dict:
    return {name: load_model(path, device="cpu") for name, path in family_dirs.items()}


def ids_of(model, *tokens: str) -> list[int]:
    return [model.tokenizer.token_to_id(t) for t in tokens]


def text_ids(model, text: str) -> list[int]:
    return model.tokenizer.encode(text, add_special_tokens=False).ids


class ForcedHead(torch.nn.Module):
    """Stands in for lm_head: step k puts all mass on `schedule[k]` at every masked position
    (the last entry repeats); the network below it still runs for real."""

    def __init__(self, vocab: int, schedule: list[int]):
        super().__init__()
        self.vocab, self.schedule, self.calls = vocab, schedule, 0

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # (M, H) -> (M, V)
        token = self.schedule[min(self.calls, len(self.schedule) - 1)]
        self.calls += 1
        logits = torch.zeros(rows.shape[0], self.vocab)
        logits[:, token] = 30.0
        return logits


class BoostedHead(torch.nn.Module):
    """The real lm_head, with `boost` added to the logits of `tokens`: a model that would
    rather write those tokens than anything else."""

    def __init__(self, real: torch.nn.Module, tokens: list[int], boost: float = 8.0):
        super().__init__()
        self.real, self.tokens, self.boost = real, torch.tensor(tokens), boost

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # (M, H) -> (M, V)
        logits = self.real(rows).clone()
        logits[:, self.tokens] += self.boost
        return logits


@contextlib.contextmanager
def head(model, replacement: torch.nn.Module):
    """The model's lm_head replaced for the duration."""
    real = model.network.lm_head
    model.network.lm_head = replacement
    try:
        yield
    finally:
        model.network.lm_head = real


def forced(model, schedule: list[int]):
    return head(model, ForcedHead(model.vocab_size, schedule))


def sharp(model, tokens: list[int], confidence: float = 30.0) -> torch.Tensor:
    logits = torch.zeros(len(tokens), model.vocab_size)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = confidence
    return logits


# ---------------------------------------------------------------------------------------------
# Detection and layout


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_each_official_checkpoint_is_detected_as_its_family(family_models, name):
    assert family_models[name].family.name == SPECS[name].family


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_the_mask_is_the_published_id(family_models, name):
    published = {"dream": 151666, "diffucoder": 151666, "dreamon": 151666,
                 "open-dcoder": 151665, "llada": 126336}
    assert family_models[name].ids.mask == published[name]


def test_layouts_are_the_official_ones(family_models):
    """DreamOn: [bos] + prefix + masks + suffix + [eos] (DreamOn demo/quickstart.py); LLaDA:
    <|startoftext|> first (its tokenizer adds it); Dream / DiffuCoder / Open-dCoder: the
    plain text, with a bos only when nothing precedes the hole (shifted logits need a token)."""
    prefix, suffix = "x = 1\n", "y = 2\n"
    for name in ("dream", "diffucoder", "open-dcoder"):
        model = family_models[name]
        assert layout_ids(model, prefix, suffix) == (text_ids(model, prefix),
                                                     text_ids(model, suffix))
        assert layout_ids(model, "", suffix)[0] == ids_of(model, "<|endoftext|>")
    dreamon = family_models["dreamon"]
    bos, eos = ids_of(dreamon, "<|beginoftext|>", "<|endoftext|>")
    assert layout_ids(dreamon, prefix, suffix) == ([bos, *text_ids(dreamon, prefix)],
                                                   [*text_ids(dreamon, suffix), eos])
    llada = family_models["llada"]
    (start,) = ids_of(llada, "<|startoftext|>")
    assert layout_ids(llada, prefix, suffix) == ([start, *text_ids(llada, prefix)],
                                                 text_ids(llada, suffix))


def test_open_dcoder_with_another_mask_string_needs_only_a_config_block(family_dirs, tmp_path):
    """A qwen2 checkpoint whose tokenizer calls its mask "[MASK]" (Open-dLLM's sample.py adds
    that one when none is set) is not recognised; a diffusion_lsp block in config.json fixes
    it without code changes, and so does the same override passed in (command line)."""
    checkpoint = tmp_path / "open-dcoder-mask"
    shutil.copytree(family_dirs["open-dcoder"], checkpoint)
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    for added in tokenizer["added_tokens"]:
        if added["content"] == "<M>":
            added["content"] = "[MASK]"
    tokenizer["model"]["vocab"]["[MASK]"] = tokenizer["model"]["vocab"].pop("<M>")
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="cannot tell the model family"):
        load_model(checkpoint, device="cpu")
    with pytest.raises(ModelLoadError, match="'<M>'"):
        load_model(checkpoint, family="open-dcoder", device="cpu")
    cli = load_model(checkpoint, family="open-dcoder", device="cpu",
                     overrides={"mask_token": "[MASK]"})
    assert cli.ids.mask == 151665
    config = json.loads((checkpoint / "config.json").read_text())
    config["diffusion_lsp"] = {"family": "open-dcoder", "mask_token": "[MASK]"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    from_config = load_model(checkpoint, device="cpu")
    assert from_config.family.name == "open-dcoder" and from_config.ids.mask == 151665


def test_unknown_override_keys_name_the_known_ones():
    with pytest.raises(ValueError, match="mask_token, end_of_hole_token"):
        apply_overrides(get_family("dream"), {"mask": "<M>"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("mask_token")
    assert parse_override("mask_token=<M>") == ("mask_token", "<M>")
    family = apply_overrides(get_family("dream"), {"extra_end_tokens": "<a>,<b>",
                                                   "shifted_logits": "false", "eos_token": ""})
    assert family.extra_end_tokens == ("<a>", "<b>") and not family.shifted_logits
    assert family.eos_token is None and "pad_token" in OVERRIDABLE


# ---------------------------------------------------------------------------------------------
# End, pad, expand, delete


def test_diffucoder_pad_ends_the_hole_and_is_never_text(family_models):
    model = family_models["diffucoder"]
    (pad,) = ids_of(model, "<|dlm_pad|>")
    word = text_ids(model, "return")[0]
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(max_tokens=4, initial_tokens=4))
    apply_step(model, state, sharp(model, [word, pad, pad, pad]))
    result_text = model.tokenizer.decode([word])
    from model.decoding.hole import final_text
    assert state.finish_reason == "end" and final_text(model, state) == (result_text, 1)
    with forced(model, [pad]):
        done = infill(model, PREFIX, SUFFIX, InfillOptions(max_tokens=8))
    assert done.text == "" and done.finish_reason == "end" and done.steps == 1


def test_dreamon_expand_becomes_two_masks_and_drops_the_cache(family_models):
    model = family_models["dreamon"]
    (expand,) = ids_of(model, "<|expand|>")
    word = text_ids(model, "return")[0]
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(max_tokens=8, initial_tokens=3,
                                                           threshold=0.9))
    forward_holes(model, [state])  # fills the context cache
    assert not needs_full_pass(state)
    logits = sharp(model, [expand, word, word])
    logits[1:, word] = 0.5  # only position 0 is sure
    apply_step(model, state, logits)
    assert state.hole.tolist() == [model.ids.mask] * 4 and state.masked.all()
    assert needs_full_pass(state)  # the hole's length changed: cached context is stale


def test_dreamon_delete_drops_the_position_and_the_masks_after_it(family_models):
    model = family_models["dreamon"]
    (delete,) = ids_of(model, "<|delete|>")
    a, b = text_ids(model, "return")[0], text_ids(model, "print")[0]
    state = new_state(model, PREFIX, SUFFIX, InfillOptions(max_tokens=8, initial_tokens=5,
                                                           threshold=0.9))
    logits = sharp(model, [a, a, delete, a, b])
    logits[[1, 3], a] = 0.5  # positions 1 and 3 stay masked this step
    apply_step(model, state, logits)
    # 2 (delete) and 3 (masked, after the delete) are gone; 4 was committed and stays
    assert state.hole.tolist() == [a, model.ids.mask, b]
    assert state.masked.tolist() == [False, True, False]


def test_dreamon_never_expands_past_max_tokens(family_models):
    model = family_models["dreamon"]
    (expand,) = ids_of(model, "<|expand|>")
    word = text_ids(model, "return")[0]
    with forced(model, [expand, expand, word]):
        done = infill(model, PREFIX, SUFFIX, InfillOptions(max_tokens=6, initial_tokens=2))
    assert done.trace[0].hole == [model.ids.mask] * 4  # 2 masks, each expanded
    assert done.trace[1].hole == [model.ids.mask] * 6  # 4 expands, room for 2 more masks
    assert done.tokens == 6 and done.text == model.tokenizer.decode([word] * 6)
    assert done.finish_reason == "max_tokens" and done.steps == 3
    assert done.full_passes == done.steps  # every expansion invalidated the context cache
    at_budget = new_state(model, PREFIX, SUFFIX, InfillOptions(max_tokens=2, initial_tokens=2))
    apply_step(model, at_budget, sharp(model, [expand, expand]))
    assert expand not in at_budget.hole.tolist() and len(at_budget.hole) == 2


def test_llada_pads_with_endoftext_and_eot_ends_too(family_models):
    model = family_models["llada"]
    end, eot = ids_of(model, "<|endoftext|>", "<|eot_id|>")
    word = text_ids(model, "return")[0]
    for closer in (end, eot):
        state = new_state(model, PREFIX, SUFFIX, InfillOptions(max_tokens=3, initial_tokens=3))
        apply_step(model, state, sharp(model, [word, closer, closer]))
        assert state.finish_reason == "end" and state.closed_at == 2


# ---------------------------------------------------------------------------------------------
# No special token in any completion


def _completions(model, name: str):
    """Completions from a model that prefers the tokens that used to leak: greedy, then
    sampled (temperature 1) over many seeds."""
    leaking = ids_of(model, *leaking_tokens(SPECS[name]))
    runs = [(0.0, 0)] + [(1.0, seed) for seed in SEEDS]
    with head(model, BoostedHead(model.network.lm_head, leaking)):
        for temperature, seed in runs:
            yield infill(model, PREFIX, SUFFIX, InfillOptions(
                max_tokens=5, temperature=temperature, seed=seed, threshold=0.5)).text


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_no_completion_contains_a_special_token(family_models, name):
    model = family_models[name]
    banned = list(SPECS[name].tokens)
    for text in _completions(model, name):
        assert not [t for t in banned if t in text], text


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_without_the_ban_special_tokens_would_leak(family_models, name):
    """The property above is not vacuous: these checkpoints favour the leaking tokens."""
    model = family_models[name]
    unbanned = dataclasses.replace(model, never_sample=torch.zeros_like(model.never_sample))
    leaking = leaking_tokens(SPECS[name])
    assert any(any(t in text for t in leaking) for text in _completions(unbanned, name))


def test_padded_vocabulary_rows_are_never_sampled(family_models):
    """LLaDA's embedding has 126464 rows; ids past its tokenizer's last token are not text."""
    model = family_models["llada"]
    assert model.vocab_size == 126464
    assert bool(model.never_sample[126349:].all())
    assert not model.never_sample[ids_of(model, "<|endoftext|>", "<|eot_id|>")].any()
    assert model.never_sample[ids_of(model, "<|mdm_mask|>", "<|startoftext|>")].all()


def test_dreamon_holes_that_change_length_batch_like_single_ones(family_models):
    """The engine batches holes whose lengths change under expand / delete at different steps;
    each comes out as it would alone, with no special token in it."""
    from model.engine import Engine

    model = family_models["dreamon"]
    edits = ids_of(model, "<|expand|>", "<|delete|>")
    leaking = ids_of(model, *leaking_tokens(SPECS["dreamon"]))
    holes = [(PREFIX, SUFFIX), ("x = [", "]\n"), ("", "def g():\n    pass\n"), ("if a:\n    ", "")]
    options = InfillOptions(max_tokens=8, initial_tokens=3, threshold=0.5)
    with head(model, BoostedHead(BoostedHead(model.network.lm_head, edits, 1.5), leaking)):
        alone = [infill(model, p, s, options) for p, s in holes]
        engine = Engine(model)
        try:
            together = [r.result(60) for r in [engine.submit(p, s, options) for p, s in holes]]
        finally:
            engine.close()
    assert [(r.text, r.steps) for r in alone] == [(r.text, r.steps) for r in together]
    assert any(len(r.trace[0].hole) != 3 for r in alone)  # some hole did change length
    # the expansion budget ends expand / delete cycles (this one looped forever without it)
    assert all(r.finish_reason == "end" and r.steps <= 3 * options.max_tokens for r in alone)
    for result in together:
        assert not [t for t in SPECS["dreamon"].tokens if t in result.text]


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_exact_mode_follows_the_reference_but_its_text_has_no_special_token(family_models,
                                                                              name):
    """Exact mode samples as the references do (specials included, so its trajectory is
    theirs); the completion still leaves them out."""
    model = family_models[name]
    leaking = ids_of(model, *leaking_tokens(SPECS[name]))
    with head(model, BoostedHead(model.network.lm_head, leaking)):
        results = [infill(model, PREFIX, SUFFIX, InfillOptions(
            max_tokens=5, temperature=1.0, seed=seed, exact=True)) for seed in range(4)]
    committed = {token for r in results for step in r.trace for _, token in step.committed}
    assert committed & set(leaking)  # the reference would write them ...
    for result in results:  # ... the completion does not
        assert not [t for t in SPECS[name].tokens if t in result.text], result.text
