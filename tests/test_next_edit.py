"""Next edits, the pure pieces: Inception's edit prompt both ways, the edit history, the
editable region, the rewrite turned into the smallest edits, and the undo guard."""

from __future__ import annotations

import random

import pytest

from diffusion_contract import edit_wire
from diffusion_contract.wire import WireError
from lsp_server import next_edit as nes
from lsp_server.next_edit import (
    History,
    Region,
    Viewed,
    apply_changes,
    editable_region,
    region_edits,
    suggestion,
    undoes,
)

FILE = "import os\n\ndef area(width, height):\n    return width * height\n\nprint(area(2, 3))\n"


def prompt(**changes) -> edit_wire.EditPrompt:
    fields = dict(path="src/shapes.py", above="import os\n\n",
                  region="def area(w, height):\n    return width * height",
                  cursor=12, below="\n\nprint(area(2, 3))\n",
                  history=("--- src/shapes.py\n+++ src/shapes.py\n@@ -3 +3 @@\n"
                           "-def area(width, height):\n+def area(w, height):\n",),
                  snippets=(("src/util.py", "def side(x):\n    return x"),))
    fields.update(changes)
    return edit_wire.EditPrompt(**fields)


def test_the_prompt_has_inceptions_sections_in_order():
    content = edit_wire.render(prompt())
    order = [content.index(tag) for tag in (
        "<|recently_viewed_code_snippets|>", "<|recently_viewed_code_snippet|>",
        "code_snippet_file_path: src/util.py", "<|/recently_viewed_code_snippets|>",
        "<|current_file_content|>", "current_file_path: src/shapes.py", "<|code_to_edit|>",
        "<|cursor|>", "<|/code_to_edit|>", "<|/current_file_content|>",
        "<|edit_diff_history|>", "--- src/shapes.py", "<|/edit_diff_history|>")]
    assert order == sorted(order)
    assert "import os\n\n<|code_to_edit|>\ndef area(w, <|cursor|>height):" in content
    assert "return width * height\n<|/code_to_edit|>\n\nprint(area(2, 3))\n\n" in content


@pytest.mark.parametrize("changes", [
    {}, {"history": (), "snippets": ()}, {"below": "", "cursor": 0}, {"above": ""},
    {"region": "", "cursor": 0}, {"history": ("--- a\n+++ a\n@@ -1 +1 @@\n-x\n+y\n",
                                              "--- b\n+++ b\n@@ -1 +1 @@\n-p\n+q\n")}])
def test_parse_reads_back_what_render_wrote(changes):
    original = prompt(**changes)
    assert edit_wire.parse(edit_wire.render(original)) == original


def test_empty_sections_are_still_written():
    content = edit_wire.render(prompt(history=(), snippets=()))
    assert "<|recently_viewed_code_snippets|>\n<|/recently_viewed_code_snippets|>" in content
    assert "<|edit_diff_history|>\n<|/edit_diff_history|>" in content


@pytest.mark.parametrize("content, problem", [
    ("no sections at all", "current_file_content"),
    ("<|current_file_content|>\nx\n<|/current_file_content|>", "code_to_edit"),
    ("<|current_file_content|>\n<|code_to_edit|>\nx\n<|/code_to_edit|>\n<|/current_file_content|>",
     "cursor"),
])
def test_a_malformed_prompt_is_refused_with_the_reason(content, problem):
    with pytest.raises(WireError, match=problem):
        edit_wire.parse(content)


@pytest.mark.parametrize("answer, region", [
    ("```\ndef f(a):\n    return a\n```", "def f(a):\n    return a"),
    ("```python\nx = 1\n```\n", "x = 1"),
    ("x = 1", "x = 1"),
    ("```\nx = <|cursor|>1\n```", "x = 1"),
    ("```\n<|code_to_edit|>\nx = 1\n<|/code_to_edit|>\n```", "x = 1"),
    ("None", None), ("```\nNone\n```", None), (None, None),
])
def test_the_answer_is_the_fenced_region(answer, region):
    assert edit_wire.region_of_answer(answer) == region


def test_edit_request_is_one_user_message_without_streaming():
    body = edit_wire.edit_request("mercury-edit-2", prompt(), 300)
    request, parsed = edit_wire.decode_edit(__import__("msgspec").json.encode(body))
    assert [m.role for m in request.messages] == ["user"] and request.stream is False
    assert parsed == prompt()


@pytest.mark.parametrize("body, problem", [
    (b"{", "bad request body"),
    (b'{"model": "m", "messages": []}', "exactly one message"),
    (b'{"model": "m", "messages": [{"role": "system", "content": "x"}]}', "exactly one"),
    (b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}',
     "stream"),
    (b'{"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}',
     "max_tokens"),
])
def test_bad_edit_requests_are_refused(body, problem):
    with pytest.raises(WireError, match=problem):
        edit_wire.decode_edit(body)


# -- history -------------------------------------------------------------------------------------


def typed(history: History, text: str, at: int, word: str, now: float) -> str:
    for index, char in enumerate(word):
        text = text[:at + index] + char + text[at + index:]
        history.observe(text, now + index * 0.2)
    return text


def test_a_word_typed_letter_by_letter_is_one_hunk():
    history = History("a.py", FILE)
    text = typed(history, FILE, FILE.index("height):"), "depth, ", now=0.0)
    assert len(history.entries) == 1
    (diff,) = history.diffs()
    assert "-def area(width, height):" in diff and "+def area(width, depth, height):" in diff
    assert diff.startswith("--- a.py\n+++ a.py\n@@")
    assert history.text == text


def test_edits_far_apart_or_later_are_separate_hunks_oldest_first():
    history = History("a.py", FILE)
    text = FILE.replace("import os", "import sys")
    history.observe(text, 0.0)
    text = text.replace("print(area(2, 3))", "print(area(4, 5))")
    history.observe(text, 1.0)  # five lines away
    text = text.replace("import sys", "import json")
    history.observe(text, 100.0)  # same place, much later
    diffs = history.diffs()
    assert len(diffs) == 3
    assert "+import sys" in diffs[0] and "+print(area(4, 5))" in diffs[1]
    assert "+import json" in diffs[2]


def test_history_is_bounded_by_count_and_characters():
    history = History("a.py", "x\n" * 200, max_edits=4, max_chars=400)
    text = history.text
    for line in range(0, 200, 20):
        lines = text.split("\n")
        lines[line] = "y" * 60
        text = "\n".join(lines)
        history.observe(text, float(line))
    assert len(history.entries) <= 4
    assert sum(len(d) for d in history.diffs()) <= 400
    assert "yyyy" in history.diffs()[-1] and "@@ -179" in history.diffs()[-1]


def test_an_edit_and_its_undo_leave_no_hunk():
    history = History("a.py", FILE)
    history.observe(FILE.replace("width *", "w *"), 0.0)
    history.observe(FILE, 0.5)
    assert history.diffs() == ()


# -- region and snippets -------------------------------------------------------------------------


def count(text: str) -> int:
    return len(text.split())


def test_the_editable_region_is_whole_lines_around_the_cursor():
    text = "\n".join(f"line {i}" for i in range(40))
    region = editable_region(text, 20, count, above=4, below=8, max_tokens=1000)
    assert (region.first, region.last) == (16, 28)
    assert text[region.start:region.end] == "\n".join(f"line {i}" for i in range(16, 29))


def test_the_editable_region_shrinks_to_its_token_cap_keeping_the_cursor_line():
    text = "\n".join(f"line {i}" for i in range(40))
    region = editable_region(text, 20, count, above=4, below=8, max_tokens=10)
    assert region.first <= 20 <= region.last
    assert count(text[region.start:region.end]) <= 10
    edge = editable_region(text, 0, count, max_tokens=1)
    assert (edge.first, edge.last) == (0, 0)


def test_viewed_snippets_use_the_latest_text_and_are_bounded():
    texts = {f"file:///{i}.py": "\n".join(f"{i}:{n}" for n in range(100)) for i in range(8)}
    viewed = Viewed()
    for uri in texts:
        viewed.saw(uri, 50)
    texts["file:///7.py"] = "changed\n" * 30
    snippets = viewed.snippets("file:///0.py", texts.get, lambda uri: uri.rsplit("/", 1)[-1],
                               max_snippets=3, lines=20)
    assert [path for path, _ in snippets] == ["5.py", "6.py", "7.py"]  # oldest first
    assert snippets[-1][1].startswith("changed")
    assert snippets[0][1].split("\n") == [f"5:{n}" for n in range(40, 60)]
    viewed.forget("file:///7.py")
    assert "7.py" not in dict(viewed.snippets("x", texts.get, lambda u: u[-4:]))


# -- edits ---------------------------------------------------------------------------------------


def test_a_rewrite_becomes_the_smallest_edits():
    old = "def area(w, height):\n    return width * height\n\nx = width"
    new = "def area(w, height):\n    return w * height\n\nx = w"
    changes = region_edits(old, new, offset=100)
    assert [(c.start - 100, c.end - 100, c.text) for c in changes] == [
        (old.index("width *") + 1, old.index("width *") + 5, ""),  # "idth" goes
        (old.rindex("width") + 1, len(old), "")]
    assert region_edits(old, old) == []


def test_edits_that_add_or_drop_lines_at_the_end_of_the_document():
    for old, new in [("a\nb", "a"), ("a", "a\nb"), ("a\nb", "a\nb\nc"), ("", "x"), ("x", "")]:
        document = "head\n" + old
        changes = region_edits(old, new, offset=5, at_end=True)
        assert apply_changes(document, changes) in ("head\n" + new, "head\n" + new + "\n")


def test_edits_applied_give_the_rewrite_for_random_texts():
    rng = random.Random(7)
    alphabet = ["a", "b", " ", "\n", "(", "x"]
    for _ in range(400):
        old = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        new = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        document = "above\n" + old + "\nbelow"
        changes = region_edits(old, new, offset=6)
        assert apply_changes(document, changes) == "above\n" + new + "\nbelow", (old, new)
        spans = sorted((c.start, c.end) for c in changes)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no overlap


def test_a_suggestion_never_takes_back_the_latest_edit():
    history = History("a.py", FILE)
    renamed = FILE.replace("def area(width,", "def area(w,")
    history.observe(renamed, 0.0)
    region = Region(2, 3, renamed.index("def"), renamed.index("\n\nprint"))
    old = renamed[region.start:region.end]
    follow = old.replace("width *", "w *")
    back = old.replace("def area(w,", "def area(width,")
    assert suggestion(renamed, region, follow, history.latest())
    assert suggestion(renamed, region, back, history.latest()) == []
    assert undoes(history.latest(), renamed, region_edits(old, back, region.start))
    # deleting what was just typed is taking it back too
    typed_text = FILE.replace("height):", "height, depth):")
    history = History("a.py", FILE)
    history.observe(typed_text, 0.0)
    start = typed_text.index(", depth")
    assert undoes(history.latest(), typed_text,
                  region_edits(typed_text[start:start + 7], "", start))
    assert not undoes(history.latest(), typed_text,
                      region_edits("", ", depth", typed_text.index("(2, 3") + 5))


def test_feedback_counts_per_kind_and_sees_an_edit_applied_without_its_command():
    from lsp_server.next_edit import Feedback

    feedback = Feedback()
    feedback.offer("a", "nextEdit", "u", result="after")
    feedback.offer("b", "nextEdit", "u", result="other")
    feedback.offer("c", "completion", "u")
    assert not feedback.shown("unknown") and feedback.shown("a")
    feedback.document_changed("u", "typed something else")
    assert feedback.counts["nextEdit"]["accepted"] == 0
    feedback.document_changed("u", "after")  # the client applied it (copilot-lsp's way)
    assert feedback.shown("b")
    assert feedback.shown("c") and feedback.accepted("c", partial=True)
    feedback.closed("u")  # "b" was pending
    assert feedback.snapshot() == {
        "nextEdit": {"shown": 2, "accepted": 1, "rejected": 1, "partial": 0,
                     "acceptanceRate": 0.5},
        "completion": {"shown": 1, "accepted": 1, "rejected": 0, "partial": 1,
                       "acceptanceRate": 1.0}}
    assert not feedback.accepted("a")  # decided once


def test_a_model_that_predicts_no_edit_is_asked_less_and_less_often():
    backoff = nes.Backoff()
    asked = []
    for _ in range(40):
        ask = backoff.should_ask()
        asked.append(ask)
        if ask:
            backoff.answered(False)
    # three empty answers, then 1, 2, 4, 8, 16 requests skipped before each next question
    assert asked[:3] == [True] * 3 and sum(asked) == 8
    assert asked[3:6] == [False, True, False]
    backoff.answered(True)  # an edit: asked every time again
    assert all(backoff.should_ask() for _ in range(3))
