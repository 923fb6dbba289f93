"""`bench next-edit`'s edit set and scoring (the run itself is the benchmark, not a test)."""

from __future__ import annotations

from benchmarks.next_edit import KINDS, applied, build_cases, edit_params, oracle, summarize
from diffusion_contract.edit_wire import EditPrompt

MODULE = '''
def scale(width, height, factor):
    area = width * height + width
    return area * factor


def shrink(size):
    return size // 2


def grow(size, step):
    return size + step


total = grow(1, 2)
other = grow(total, 3)
small = shrink(4)
'''


def test_cases_come_from_real_files_with_the_three_kinds(tmp_path):
    (tmp_path / "shapes.py").write_text(MODULE)
    cases = build_cases(2, root=tmp_path)
    kinds = {case.kind: case for case in cases}
    assert set(kinds) == set(KINDS)
    rename = kinds["rename"]
    assert rename.edited.startswith("def scale(") and rename.expected != rename.edited
    assert rename.source == "shapes.py:2"
    added = kinds["add-parameter"]
    assert "grow(1, 2, " in added.edited and "grow(total, 3)" in added.edited
    assert added.expected.count(added.expected.split("grow(1, 2, ")[1].split(")")[0]) >= 3
    signature = kinds["signature"]
    assert signature.expected.count("shrink_") == 2 and signature.edited.count("shrink_") == 1


def test_the_standard_library_gives_every_kind():
    cases = build_cases(3)
    assert {case.kind for case in cases} == set(KINDS)
    for case in cases:
        change = edit_params(case.before, case.edited)
        lines = case.before.split("\n")
        rebuilt = "".join(line + "\n" for line in lines[:change["start"]]) + change["text"] + (
            "\n".join(lines[change["end"]:]))
        assert rebuilt == case.edited  # the didChange the bench sends is the user's edit


def test_the_oracle_answers_the_expected_region_and_scoring_counts_it(tmp_path):
    (tmp_path / "shapes.py").write_text(MODULE)
    case = build_cases(1, root=tmp_path)[0]
    lines = case.edited.split("\n")
    above, region, below = "", "\n".join(lines[:-1]), "\n"
    rewrite = oracle([case])
    new_region = rewrite(EditPrompt("x.py", above, region, 0, below))
    assert above + new_region + below == case.expected
    assert rewrite(EditPrompt("x.py", "", "other", 0, "")) == "other"
    edit = {"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 3}},
            "text": "fed"}
    assert applied("def f():\n", [edit]) == "fed f():\n"
    summary = summarize("x", [{"kind": "rename", "latency_ms": 5.0, "exact": True,
                               "suggested": True},
                              {"kind": "rename", "latency_ms": 15.0, "exact": False,
                               "suggested": False}])
    assert summary["all"]["exact_match"] == 0.5 and summary["by_kind"]["signature"]["cases"] == 0
