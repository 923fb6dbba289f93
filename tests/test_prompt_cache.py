"""A document's context kept across completions: reuse, invalidation, bounds, the engine path."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import DynamicCache

from diffusion_contract.options import InfillOptions
from lsp_server.backends.base import CompletionJob
from lsp_server.backends.local import LocalBackend
from model.decoding.passes import window
from model.decoding.prompt_cache import PromptCache, move_keys
from model.decoding.sampler import infill, new_state
from model.engine import Engine

from .conftest import FAMILY_NAMES

ABOVE = "import os\n\ndef helper(x):\n    return x * 2\n\n"
PREFIX = ABOVE + "def add(a, b):\n    total = a + b\n    return "
SUFFIX = "\n\nprint(add(1, 2))\n"
OPTIONS = InfillOptions(max_tokens=8, initial_tokens=8, tokens_per_step=3)


def context_tokens(model, prefix: str, suffix: str) -> int:
    state = new_state(model, prefix, suffix, OPTIONS)
    start, _ = window(state, model.family.shifted_logits)
    return start + len(state.suffix_ids)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_an_unchanged_document_completes_as_without_the_cache(tiny_models, name):
    model = tiny_models[name]
    cache = PromptCache()
    plain = infill(model, PREFIX, SUFFIX, OPTIONS)
    first = infill(model, PREFIX, SUFFIX, OPTIONS, cache=cache, document="a.py")
    again = infill(model, PREFIX, SUFFIX, OPTIONS, cache=cache, document="a.py")
    assert first.reused_tokens == 0
    assert again.reused_tokens == context_tokens(model, PREFIX, SUFFIX)
    assert again.full_passes == plain.full_passes - 1  # the first pass ran the hole only
    assert [s.hole for s in again.trace] == [s.hole for s in plain.trace]
    assert again.text == plain.text


def test_an_edit_above_the_cursor_reuses_only_the_rows_before_it(tiny_models):
    model = tiny_models["dream"]
    cache = PromptCache()
    infill(model, PREFIX, SUFFIX, OPTIONS, cache=cache, document="a.py")
    before = [layer[0].clone() for layer in cache._entries["a.py"].layers]
    edited = PREFIX.replace("x * 2", "x * 3 + 1")
    old_ids = new_state(model, PREFIX, SUFFIX, OPTIONS).prefix_ids
    new_ids = new_state(model, edited, SUFFIX, OPTIONS).prefix_ids
    unchanged = next(i for i, (a, b) in enumerate(zip(old_ids, new_ids, strict=False)) if a != b)

    state = new_state(model, edited, SUFFIX, OPTIONS)
    reuse = cache.lookup(model, "a.py", state)
    assert reuse.prefix_rows == unchanged
    assert reuse.suffix_rows == len(state.suffix_ids)  # the text after the cursor did not change

    result = infill(model, edited, SUFFIX, OPTIONS, cache=cache, document="a.py")
    assert result.reused_tokens == unchanged + len(state.suffix_ids)
    entry = cache._entries["a.py"]
    start, _ = window(state, True)
    assert entry.prefix_ids == new_ids[:start]  # the cache now holds the edited document
    for old, (keys, _) in zip(before, entry.layers, strict=True):
        assert torch.equal(keys[..., :unchanged, :], old[..., :unchanged, :])  # reused
        assert not torch.allclose(keys[..., unchanged, :], old[..., unchanged, :])  # recomputed


def test_a_document_whose_start_changed_reuses_nothing(tiny_models):
    model = tiny_models["default"]  # bos first, then the text: the first text token differs
    cache = PromptCache()
    infill(model, PREFIX, SUFFIX, OPTIONS, cache=cache, document="a.py")
    result = infill(model, "x = 1\n" + PREFIX, "pass\n", OPTIONS, cache=cache, document="a.py")
    assert result.reused_tokens == 1  # the bos token alone


def test_suffix_keys_moved_to_new_positions_equal_keys_computed_there(tiny_models):
    model = tiny_models["dream"]
    ids = torch.tensor([model.tokenizer.encode(PREFIX).ids])
    shift = 7

    def keys_at(offset: int) -> list[torch.Tensor]:
        cache = DynamicCache()
        positions = torch.arange(ids.shape[1])[None] + offset
        with torch.inference_mode():
            model.network.model(input_ids=ids, position_ids=positions, past_key_values=cache,
                                use_cache=True)
        return [layer.keys for layer in cache.layers]

    for here, there in zip(keys_at(0), keys_at(shift), strict=True):
        assert torch.allclose(move_keys(model, here, shift), there, atol=1e-4)
        assert not torch.allclose(here, there, atol=1e-2)


def test_the_cache_keeps_the_most_recently_used_documents(tiny_models):
    model = tiny_models["dream"]
    cache = PromptCache(max_documents=2)
    for document in ("a.py", "b.py"):
        infill(model, PREFIX, SUFFIX, OPTIONS, cache=cache, document=document)
    cache.lookup(model, "a.py", new_state(model, PREFIX, SUFFIX, OPTIONS))  # a.py used last
    infill(model, PREFIX, SUFFIX, OPTIONS, cache=cache, document="c.py")
    assert "a.py" in cache and "c.py" in cache and "b.py" not in cache

    one = cache.nbytes // 2
    small = PromptCache(max_bytes=one + one // 2)
    for document in ("a.py", "b.py", "c.py"):
        infill(model, PREFIX, SUFFIX, OPTIONS, cache=small, document=document)
    assert len(small) == 1 and "c.py" in small and small.nbytes <= small.max_bytes


def test_after_max_reuses_the_context_is_computed_afresh(tiny_models):
    model = tiny_models["dream"]
    cache = PromptCache(max_reuses=2)
    reused = [infill(model, PREFIX, SUFFIX, OPTIONS, cache=cache, document="a.py").reused_tokens
              for _ in range(5)]
    assert [bool(r) for r in reused] == [False, True, True, False, True]


def test_the_engine_and_the_local_backend_reuse_a_documents_context(tiny_models):
    model = tiny_models["dream"]
    engine = Engine(model, prompt_cache=PromptCache())
    backend = LocalBackend()
    backend.engine = engine
    job = CompletionJob(prefix=PREFIX, suffix=SUFFIX, max_tokens=6, single_line=True,
                        document="file:///a.py")
    try:
        first = asyncio.run(backend.complete(job))
        second = asyncio.run(backend.complete(job))
        assert first.extra["reused_tokens"] == 0
        assert second.extra["reused_tokens"] == context_tokens(model, PREFIX, SUFFIX)
        assert second.text == first.text
        other = engine.submit(PREFIX, SUFFIX, OPTIONS).result(30)  # no document: no reuse
        assert other.reused_tokens == 0
    finally:
        engine.close()
