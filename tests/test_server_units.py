"""The server's pure parts: positions, context budgets, clean-up rules, cache, settings."""

from __future__ import annotations

import pytest
from lsprotocol import types

from lsp_server import context as ctx
from lsp_server.backends import BackendError
from lsp_server.cache import CompletionCache
from lsp_server.postprocess import (
    Surroundings,
    choose_multiline,
    clean,
    detect_indent_unit,
    drop_closed_brackets,
    match_indentation,
    stop_at_dedent,
    trim_line_suffix,
    trim_repeated_lines,
)
from lsp_server.settings import ContextSettings, Settings, merge


def words(text: str) -> int:
    """A stand-in token counter: one token per whitespace-separated word (plus one)."""
    return len(text.split()) + 1 if text else 0


# -- positions ------------------------------------------------------------------------------------


def test_locate_utf16_counts_astral_characters_twice():
    text = 'x = "😋é"; y\nz'
    # after the é: 7 code points but 8 UTF-16 units
    cursor = ctx.locate(text, 0, 8, "utf-16")
    assert text[: cursor.offset] == 'x = "😋é'
    assert ctx.locate(text, 0, 6, "utf-32").offset == 6
    assert text[: ctx.locate(text, 0, 9, "utf-8").offset] == 'x = "😋'
    assert ctx.units_of('x = "😋', "utf-16") == 7


def test_locate_inside_a_surrogate_pair_rounds_down():
    cursor = ctx.locate("a😋b", 0, 2, "utf-16")
    assert cursor.offset == 1 and cursor.line_after == "😋b"


def test_locate_cjk_and_lines():
    text = "第一行\n中文代码 = 1\n"
    cursor = ctx.locate(text, 1, 4, "utf-16")
    assert cursor.line_before == "中文代码" and cursor.line_after == " = 1"
    assert ctx.locate(text, 2, 0).offset == len(text)  # the empty last line exists


def test_positions_past_the_end():
    with pytest.raises(ctx.PositionError):
        ctx.locate("one\ntwo", 5, 0)
    with pytest.raises(ctx.PositionError):
        ctx.locate("one", -1, 0)
    cursor = ctx.locate("one\ntwo", 0, 99)  # past the end of a line: the end of the line
    assert cursor.offset == 3 and cursor.line_after == ""


def test_crlf_lines():
    cursor = ctx.locate("a = 1\r\nb = 2\r\n", 1, 99)
    assert cursor.line_before == "b = 2" and cursor.line_after == ""


def test_sanitize_replaces_lone_surrogates_keeping_length():
    text = "ok \ud800 bad"
    clean_text = ctx.sanitize(text)
    assert len(clean_text) == len(text)
    clean_text.encode("utf-8")


# -- context budgets ------------------------------------------------------------------------------


def test_cut_prefix_keeps_whole_lines_and_the_enclosing_def():
    body = "\n".join(f"    x{i} = compute(x{i - 1}) + 1" for i in range(1, 200))
    prefix = f"import os\n\ndef long_function(a, b):\n{body}\n    return "
    cut = ctx.cut_prefix(prefix, 60, words)
    assert words(cut) <= 60
    assert cut.startswith("def long_function(a, b):\n")
    assert cut.endswith("    x199 = compute(x198) + 1\n    return ")
    assert "import os" not in cut


def test_cut_prefix_under_budget_is_unchanged():
    assert ctx.cut_prefix("a = 1\nb = ", 100, words) == "a = 1\nb = "


def test_cut_prefix_nested_headers():
    prefix = ("class A:\n    def f(self):\n" + "        y = 1\n" * 100 + "        return ")
    cut = ctx.cut_prefix(prefix, 40, words)
    assert cut.startswith("class A:\n    def f(self):\n        y = 1\n")


def test_cut_suffix_keeps_the_first_lines():
    suffix = ")\n" + "".join(f"line{i} = {i}\n" for i in range(100))
    cut = ctx.cut_suffix(suffix, 20, words)
    assert cut.startswith(")\nline0 = 0\n") and words(cut) <= 20
    assert cut.endswith("\n")


def test_build_context_on_a_huge_document_looks_at_a_window():
    text = "x = 1\n" * 1_000_000 + "def f():\n    return \n"
    cursor = ctx.locate(text, 1_000_001, 11)
    context = ctx.build_context(text, cursor, words,
                                ContextSettings(prefix_tokens=50, suffix_tokens=20))
    assert context.prefix.endswith("def f():\n    return ")
    assert len(context.prefix) < 2000


def test_snippets_from_similar_documents():
    query = "def parse_config(path):\n    settings = load_settings(path)\n    return "
    others = [
        ("util.py", "def load_settings(path):\n    with open(path) as f:\n"
                    "        settings = json.load(f)\n    return settings\n"),
        ("other.py", "class Unrelated:\n    pass\n"),
    ]
    chosen = ctx.pick_snippets(query, others, max_snippets=2, snippet_lines=8)
    assert [s.name for s in chosen] == ["util.py"]
    rendered = ctx.render_snippets(chosen, "python", 200, words)
    assert rendered.startswith("# Compare this snippet from util.py:\n# def load_settings(path):")
    assert ctx.render_snippets(chosen, "python", 3, words) == ""  # over budget
    assert ctx.render_snippets(chosen, "no-such-language", 200, words) == ""
    budget = ContextSettings(prefix_tokens=100, suffix_tokens=20, snippet_tokens=200,
                             max_snippets=2, snippet_lines=8)
    context = ctx.build_context(query, ctx.locate(query, 2, 11), words, budget, others=others,
                                language_id="python")
    assert context.snippets == 1 and context.prefix.endswith(query)


# -- clean-up -------------------------------------------------------------------------------------


def where(line_before="", line_after="", below=(), unit="    ", multiline=True, max_lines=12):
    return Surroundings(line_before, line_after, tuple(below), unit, multiline, max_lines)


def test_mode_choice():
    assert choose_multiline("    ", "") is True
    assert choose_multiline("def f():", "") is True
    assert choose_multiline("    x = ", "") is False
    assert choose_multiline("    ", "foo)") is False
    assert choose_multiline("x = ", "", "always") is True
    assert choose_multiline("    ", "", "never") is False


def test_trim_the_rest_of_the_line():
    assert trim_line_suffix("a, b)", where("print(", ")")) == "a, b"
    assert trim_line_suffix("a, b):", where("if f(", "):")) == "a, b"
    assert trim_line_suffix("x + 1", where("y = ", "")) == "x + 1"


def test_do_not_close_brackets_the_suffix_closes():
    assert drop_closed_brackets("f(x))", ")") == "f(x)"
    assert drop_closed_brackets("f(x)", ")") == "f(x)"  # balanced: keep
    assert drop_closed_brackets("a]", "]") == "a"
    assert drop_closed_brackets("a)", "") == "a)"  # nothing after: keep


def test_trim_lines_repeating_the_lines_below():
    text = "x = 1\n    y = 2\n    return x + y"
    assert trim_repeated_lines(text, where(below=["    return x + y", ""])) == "x = 1\n    y = 2"
    assert trim_repeated_lines("a\n}", where(below=["}"])) == "a\n}"  # too short to count


def test_stop_at_dedent():
    text = "total = 0\n    for x in xs:\n        total += x\nprint(total)"
    assert stop_at_dedent(text, where("    ")) == "total = 0\n    for x in xs:\n        total += x"
    after_opener = "\n    return 1\ndef g():\n    pass"
    assert stop_at_dedent(after_opener, where("def f():")) == "\n    return 1"


def test_indentation_style():
    assert detect_indent_unit(["def f():", "\tif x:", "\t\treturn 1"]) == "\t"
    assert detect_indent_unit(["def f():", "  if x:", "    return 1"]) == "  "
    assert detect_indent_unit(["x = 1"]) == "    "
    fixed = match_indentation("if x:\n    y = 1\n        z", where(unit="\t"))
    assert fixed == "if x:\n\ty = 1\n\t\tz"
    assert match_indentation("a\n\tb", where(unit="  ")) == "a\n  b"


def test_clean_end_to_end():
    assert clean("   \n  ", where("    ")) == ""
    assert clean("x + 1\nprint(x)", where("y = ", multiline=False)) == "x + 1"
    assert clean("value)  ", where("print(", ")", multiline=False)) == "value"
    text = "\n".join(f"    line{i}" for i in range(30))
    assert clean(text, where("    ", max_lines=5)).count("\n") == 4


def at(prefix: str, suffix: str) -> tuple[str, int]:
    """(document text, cursor offset) with `prefix` before the cursor and `suffix` after."""
    return prefix + suffix, len(prefix)


# -- cache ----------------------------------------------------------------------------------------


def test_cache_exact_and_type_along():
    cache = CompletionCache(size=4)
    cache.put("u", *at("def f():\n    return ", "\n"), "a + b")
    assert cache.get("u", *at("def f():\n    return ", "\n")) == "a + b"
    assert cache.get("u", *at("def f():\n    return a", "\n")) == " + b"
    assert cache.get("u", *at("def f():\n    return a +", "\n")) == " b"
    # all typed: nothing left
    assert cache.get("u", *at("def f():\n    return a + b", "\n")) is None
    assert cache.get("u", *at("def f():\n    return x", "\n")) is None  # typed something else
    assert cache.get("u", *at("def f():\n    return a", "\nmore")) is None  # suffix changed
    assert cache.get("other", *at("def f():\n    return ", "\n")) is None


def test_cache_is_bounded_and_forgets():
    cache = CompletionCache(size=3)
    for i in range(10):
        cache.put("u", *at(f"p{i}", ""), "text")
    assert len(cache) == 3
    assert cache.get("u", *at("p0", "")) is None and cache.get("u", *at("p9", "")) == "text"
    cache.forget("u")
    assert len(cache) == 0
    cache.put("u", *at("p", ""), "")  # empty completions are not kept
    assert len(cache) == 0


# -- settings -------------------------------------------------------------------------------------


def test_settings_merge_partial_and_wrapped():
    settings, problems = merge(Settings(), {"diffusionLsp": {"completion": {"debounceMs": 0}}})
    assert problems == [] and settings.completion.debounce_ms == 0
    assert settings.completion.max_tokens == Settings().completion.max_tokens
    settings, _ = merge(settings, {"disabledLanguages": ["markdown"]})
    assert settings.completion.debounce_ms == 0  # earlier values stay
    assert not settings.enabled_for("markdown") and settings.enabled_for("python")


def test_settings_bad_values_are_reported_and_ignored():
    raw = {"completion": {"maxTokens": -3, "threshold": "high", "debounceMs": 5},
           "backend": "cloud", "nonsense": 1, "context": {"prefixTokens": 100}}
    settings, problems = merge(Settings(), raw)
    assert settings.completion.max_tokens == 64 and settings.completion.threshold is None
    assert settings.completion.debounce_ms == 5 and settings.context.prefix_tokens == 100
    assert settings.backend == "local"
    joined = "\n".join(problems)
    for name in ("maxTokens", "threshold", "backend", "nonsense"):
        assert name in joined
    assert merge(Settings(), "not an object")[1]
    assert merge(Settings(), None) == (Settings(), [])


def test_the_api_key_never_shows_in_a_repr():
    settings, _ = merge(Settings(), {"remote": {"apiKey": "sk-secret-123"}})
    assert settings.remote.api_key == "sk-secret-123"
    assert "sk-secret-123" not in repr(settings) and "sk-secret-123" not in str(settings)


def test_family_overrides_setting_merges_and_rejects_unknown_keys():
    settings, problems = merge(Settings(), {"model": {"familyOverrides": {"mask_token": "<M>"}}})
    assert problems == [] and settings.model.family_overrides == {"mask_token": "<M>"}
    kept, problems = merge(settings, {"model": {"familyOverrides": {"mask": "<M>"}}})
    assert kept.model.family_overrides == {"mask_token": "<M>"}
    assert problems and "known: mask_token" in problems[0]


def test_sampler_settings_decode_and_bad_ones_are_reported():
    raw = {"completion": {"sampler": {"algorithm": "entropy", "steps": 16, "topP": 0.95,
                                      "temperature": 0.2}}}
    settings, problems = merge(Settings(), raw)
    sampler = settings.completion.sampler
    assert problems == []
    assert (sampler.algorithm, sampler.steps, sampler.top_p, sampler.temperature) == (
        "entropy", 16, 0.95, 0.2)
    for bad, word in (({"algorithm": "greedy"}, "algorithm"),
                      ({"blockLength": 5, "steps": 10}, "multiple of blockLength"),
                      ({"topP": 1.5}, "topP must be in")):
        kept, problems = merge(settings, {"completion": {"sampler": bad}})
        assert word in "\n".join(problems)
    assert merge(settings, {"completion": {"sampler": {"algorithm": "greedy"}}})[0] == settings


async def test_the_local_backend_samples_as_the_settings_say(tiny_dirs, tiny_models):
    from diffusion_contract.options import InfillOptions
    from lsp_server.backends import CompletionJob
    from lsp_server.backends.local import LocalBackend
    from lsp_server.settings import ModelSettings, SamplerSettings
    from model.decoding.sampler import infill

    sampler = SamplerSettings(algorithm="low_confidence", steps=4, block_length=4,
                              temperature=0.7, seed=11, exact=True)
    settings = Settings(model=ModelSettings(path=str(tiny_dirs["llada"]), device="cpu"))
    backend = LocalBackend()
    await backend.start(settings, report=lambda message: None)
    try:
        outcome = await backend.complete(CompletionJob(
            prefix="x = ", suffix="\n", max_tokens=8, single_line=False, sampler=sampler))
        with pytest.raises(BackendError, match="sampler settings"):
            await backend.complete(CompletionJob(prefix="x = ", suffix="\n", max_tokens=6,
                                                 single_line=False, sampler=sampler))
    finally:
        await backend.close()
    expected = infill(tiny_models["llada"], "x = ", "\n", InfillOptions(
        max_tokens=8, initial_tokens=8, min_tokens=1, algorithm="low_confidence", steps=4,
        block_length=4, temperature=0.7, seed=11, exact=True))
    assert (outcome.text, outcome.steps) == (expected.text, expected.steps)


def test_notifications_leave_no_futures_behind():
    """pygls kept one future per didOpen/didChange/didClose forever (the soak's RSS growth)."""
    from pygls.workspace import Workspace

    from lsp_server.main import make_server

    protocol = make_server().protocol
    protocol._workspace = Workspace(None)
    before = len(protocol._request_futures)
    uri = "untitled:futures.py"
    protocol._handle_notification(types.TEXT_DOCUMENT_DID_OPEN, types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1,
                                             text="x = 1\n")))
    for version in range(2, 52):
        protocol._handle_notification(
            types.TEXT_DOCUMENT_DID_CHANGE, types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(start=types.Position(line=0, character=0),
                                      end=types.Position(line=0, character=0)), text="y")]))
    assert protocol.workspace.get_text_document(uri).source.startswith("y" * 50)
    protocol._handle_notification(types.TEXT_DOCUMENT_DID_CLOSE, types.DidCloseTextDocumentParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))
    assert len(protocol._request_futures) == before
