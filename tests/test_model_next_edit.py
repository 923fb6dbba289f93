"""The local next-edit rewrite (model/decoding/next_edit.py): which holes the history puts in doubt,
how the region is reassembled, and a real run on every family's tiny checkpoint."""

from __future__ import annotations

import asyncio

import pytest

from model.decoding import next_edit
from model.decoding.next_edit import Hole, Site, grown_calls, plan, renames, rewrite
from model.network.tiny import FAMILY_SPECIAL_TOKENS, write_tiny_model

RENAME = ("--- a.py\n+++ a.py\n@@ -1,2 +1,2 @@\n-def area(width, height):\n"
          "+def area(w, height):\n     return width * height\n")
ADD = ("--- a.py\n+++ a.py\n@@ -1 +1 @@\n-def area(w, h):\n+def area(w, h, d):\n"
       "@@ -5 +5 @@\n-print(area(1, 2))\n+print(area(1, 2, 3))\n")
REGION = "def area(w, height):\n    return width * height  # width\n\nx = area(width, 2)"


def words(text: str) -> int:
    return len(text.split()) or 1


def test_renames_and_grown_calls_come_from_the_diffs():
    assert renames((RENAME,)) == {"width": "w"}
    back = "--- a.py\n+++ a.py\n@@ -1 +1 @@\n-def area(w, height):\n+def area(width, height):\n"
    assert renames((RENAME, back)) == {"w": "width"}  # renamed back: only the latest stands
    assert renames(("--- a\n+++ a\n@@ -1 +1 @@\n-if x:\n+while x:\n",)) == {}  # keywords
    assert grown_calls((ADD,)) == {"area"}
    assert grown_calls((RENAME,)) == set()


def test_doubt_remasks_the_old_name_and_the_other_call_sites():
    site = Site("", REGION, 0, "", (RENAME,))
    holes = plan(site, "doubt", words)
    assert [REGION[h.start:h.end] for h in holes] == ["width", "width", "width"]
    calls = Site("", "def area(w, h, d):\n    pass\n\narea(1, 2, 3)\narea(4, 5)\n", 0, "",
                 (ADD,))
    (first, second) = plan(calls, "doubt", words)
    assert first.start == first.end and first.may_be_empty  # before `)` of area(1, 2, 3)
    assert calls.region[first.start] == ")" and calls.region[second.start] == ")"
    assert plan(Site("", REGION, 0, "", ()), "doubt", words) == []  # no history, no doubt


def test_region_is_one_hole_with_slack_and_unknown_strategies_are_refused():
    (hole,) = plan(Site("", REGION, 0, ""), "region", words)
    assert (hole.start, hole.end) == (0, len(REGION)) and hole.max_tokens > words(REGION)
    with pytest.raises(ValueError, match="known: doubt, region"):
        plan(Site("", REGION, 0, ""), "guess", words)


def test_the_history_is_laid_out_as_comments_before_the_file():
    site = Site("import os\n", REGION, 0, "\nend\n", (RENAME,), comment="#")
    prefix, suffix = next_edit.hole_context(site, REGION, Hole(25, 30, 4))
    assert prefix.startswith("# recent edits:\n# @@ -1,2 +1,2 @@\n# -def area(width, height):\n"
                             "# +def area(w, height):\n")
    assert prefix.endswith("import os\n" + REGION[:25]) and suffix == REGION[30:] + "\nend\n"
    assert next_edit.comment_for("x.lua") == "--" and next_edit.comment_for("x.ts") == "//"


def test_rewrite_fills_holes_top_down_and_keeps_a_name_it_cannot_fill():
    site = Site("", REGION, 0, "", (RENAME,))
    seen = []

    async def fill(prefix: str, suffix: str, hole: Hole) -> tuple[str, int]:
        seen.append(prefix)
        return ("w" if len(seen) < 3 else "  \n"), 2

    region, steps = asyncio.run(rewrite(site, "doubt", words, fill))
    assert region == REGION.replace("width *", "w *").replace("# width", "# w")
    assert steps == 6
    assert seen[1].endswith("return w * height  # ")  # it sees the first hole's fill
    assert asyncio.run(rewrite(Site("", REGION, 0, ""), "doubt", words, fill)) == (None, 0)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_SPECIAL_TOKENS))
def test_every_familys_tiny_checkpoint_rewrites_only_the_doubted_names(family, tmp_path):
    from diffusion_contract.options import InfillOptions
    from model.engine import Engine
    from model.network.loader import load_model

    loaded = load_model(write_tiny_model(tmp_path / family, family=family), device="cpu")
    engine = Engine.start(lambda: loaded, warm_up=False).result()
    count = lambda text: len(loaded.tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731

    async def fill(prefix: str, suffix: str, hole: Hole) -> tuple[str, int]:
        result = await engine.infill(prefix, suffix, InfillOptions(
            max_tokens=hole.max_tokens, initial_tokens=min(4, hole.max_tokens),
            min_tokens=0 if hole.may_be_empty else 1))
        return result.text, result.steps

    try:
        for strategy in ("doubt", "region"):
            region, steps = asyncio.run(rewrite(Site("x = 1\n", REGION, 0, "\n", (RENAME,)),
                                                strategy, count, fill))
            assert region is not None and steps >= 1
            if strategy == "doubt":  # only the three names may differ
                assert region.split("\n")[0] == "def area(w, height):"
                assert region.count("\n") == REGION.count("\n")
                assert region.split("\n")[2] == ""
    finally:
        engine.close()
