"""Hole markers, ranges and fills (lsp_server/holes.py): the pure part of "Fill N holes"."""

from __future__ import annotations

import pytest
from lsprotocol import types

from lsp_server import holes
from lsp_server.context import PositionError

PY = (
    "import os\n"
    "\n"
    "def area(w, h):\n"
    "    if w < 0:\n"
    "        ...\n"
    "    # TODO: compute the area\n"
    "    return result\n"
    "\n"
    "x = 1  # TODO not alone on its line\n"
)
RUST = "fn f() -> i32 {\n    let x = todo!();\n    unimplemented!(\"later (soon)\")\n}\n"


def rng(a: tuple[int, int], b: tuple[int, int]) -> types.Range:
    return types.Range(start=types.Position(line=a[0], character=a[1]),
                       end=types.Position(line=b[0], character=b[1]))


def texts(text: str, markers) -> list[str]:
    return [text[m.start:m.end] for m in markers]


def test_markers_in_python_and_rust():
    found, dropped = holes.find_markers(PY, 0, len(PY))
    assert texts(PY, found) == ["...", "# TODO: compute the area"] and dropped == 0
    found, _ = holes.find_markers(RUST, 0, len(RUST))
    assert texts(RUST, found) == ["todo!()", 'unimplemented!("later (soon)")']
    lua = "local function f()\n  -- TODO\nend\n"
    assert texts(lua, holes.find_markers(lua, 0, len(lua))[0]) == ["-- TODO"]


def test_user_patterns_and_overlaps():
    patterns, problems = holes.compile_patterns([r"<HOLE>", r"# TODO: \w+", "("])
    assert len(patterns) == 2 and len(problems) == 1 and "'('" in problems[0]
    text = "a = <HOLE>\n# TODO: compute the area\n"
    found, dropped = holes.find_markers(text, 0, len(text), patterns)
    # the comment line marker and the pattern overlap: the longer one stays
    assert texts(text, found) == ["<HOLE>", "# TODO: compute the area"] and dropped == 1


def test_a_range_holding_just_the_marker_finds_it():
    start = PY.index("...")
    found, _ = holes.find_markers(PY, start, start + 3)
    assert texts(PY, found) == ["..."]
    assert holes.find_markers(PY, start + 1, start + 3)[0] == []  # part of it: not a marker


def test_only_markers_wholly_inside_the_range():
    start = PY.index("    # TODO")
    found, _ = holes.find_markers(PY, start, len(PY))
    assert texts(PY, found) == ["# TODO: compute the area"]


def test_empty_range_means_the_enclosing_function():
    span = holes.range_offsets(PY, rng((4, 3), (4, 3)), "utf-16")
    assert PY[span[0]:span[1]] == PY[PY.index("def"):PY.index("    return result\n") + 17]
    span = holes.range_offsets(RUST, rng((1, 0), (1, 0)), "utf-16")
    assert RUST[span[0]:span[1]] == RUST.rstrip("\n")  # the closing brace belongs to it
    assert holes.range_offsets(PY, rng((0, 0), (0, 0)), "utf-16") == (0, len(PY))  # no function


def test_ranges_past_the_document_are_refused():
    with pytest.raises(PositionError, match="not in the document"):
        holes.range_offsets(PY, rng((0, 0), (40, 0)), "utf-16")
    whole = holes.range_offsets(PY, rng((0, 0), (9, 0)), "utf-16")  # one past the last line
    assert whole == (0, len(PY))
    with pytest.raises(PositionError, match="ends before"):
        holes.range_offsets(PY, rng((3, 0), (2, 0)), "utf-16")


def test_fills_keep_the_indentation_and_empty_fills_keep_the_marker():
    markers, _ = holes.find_markers(PY, 0, len(PY))
    fills = ["\n  raise ValueError('w')\n\n", "result = w * h\nif result:\nreturn 0"]
    edits = holes.text_edits(PY, markers, fills, "utf-16")
    assert [e.new_text for e in edits] == [
        "raise ValueError('w')", "result = w * h\n    if result:\n    return 0"]
    assert edits[0].range == rng((4, 8), (4, 11))
    assert edits[1].range == rng((5, 4), (5, 28))
    assert holes.text_edits(PY, markers, ["  ", "x = 1"], "utf-16")[0].new_text == "x = 1"


def test_crlf_documents_get_crlf_fills():
    text = "def f():\r\n    ...\r\n"
    markers, _ = holes.find_markers(text, 0, len(text))
    (edit,) = holes.text_edits(text, markers, ["a = 1\nreturn a"], "utf-16")
    assert edit.new_text == "a = 1\r\n    return a" and edit.range == rng((1, 4), (1, 7))


def test_utf16_positions():
    text = "s = '😀'; x = todo!()\n"
    markers, _ = holes.find_markers(text, 0, len(text))
    (edit,) = holes.text_edits(text, markers, ["1"], "utf-16")
    assert edit.range.start.character == 14  # 13 code points; the emoji is two units


def test_action_data_round_trip_and_staleness():
    markers, _ = holes.find_markers(PY, 0, len(PY))
    data = holes.ActionData("file:///a.py", 3, [(m.start, m.end) for m in markers],
                            texts(PY, markers))
    import msgspec

    parsed = holes.read_action_data(msgspec.to_builtins(data))
    assert parsed == data and holes.still_current(PY, 3, parsed)
    assert not holes.still_current(PY, 4, parsed)  # another version
    assert not holes.still_current(PY.replace("...", "pass"), 3, parsed)  # marker gone
    assert holes.read_action_data({"uri": 1}) is None
    assert holes.read_action_data(None) is None


def test_pieces_around_the_markers():
    markers, _ = holes.find_markers(PY, 0, len(PY))
    pieces = holes.pieces_for(PY, markers, lambda t: len(t.split()), 640, 192)
    assert pieces == [PY[:markers[0].start], PY[markers[0].end:markers[1].start],
                      PY[markers[1].end:]]
