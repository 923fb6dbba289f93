"""LSP's line ends (\\n, \\r\\n, \\r only) in the server's document model and cursor."""

from __future__ import annotations

import pytest
from lsprotocol import types
from pygls.workspace import PositionCodec

from lsp_server import context as ctx
from lsp_server.documents import (
    Document,
    apply_edit,
    count_lines,
    encoding_name,
    offset_at,
    split_lines,
)

LOOKALIKES = ["\u2028", "\u2029", "\x85", "\f", "\v", "\x1c", "\x1d", "\x1e"]


def change(document: Document, start: tuple[int, int], end: tuple[int, int], text: str) -> None:
    document.apply_change(types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text))


@pytest.mark.parametrize("lookalike", LOOKALIKES)
def test_an_edit_below_a_line_separator_lookalike_lands_on_the_right_line(lookalike):
    document = Document("untitled:a.py", f's = "a{lookalike}b"\nx = 1\ny = 2\n')
    change(document, (1, 4), (1, 5), "42")
    assert document.source == f's = "a{lookalike}b"\nx = 42\ny = 2\n'
    assert len(document.lines) == 4 - 1  # the lookalike does not end a line


def test_cr_only_documents_edit_and_locate():
    document = Document("untitled:mac.py", "a = 1\rb = 2\rc = 3")
    change(document, (2, 4), (2, 5), "7")
    assert document.source == "a = 1\rb = 2\rc = 7"
    cursor = ctx.locate(document.source, 1, 4)
    assert (cursor.line_before, cursor.line_after) == ("b = ", "2")
    assert count_lines(document.source) == 3


def test_mixed_line_ends_and_a_position_past_the_line_end():
    text = "a\r\nbb\rccc\nd"
    assert split_lines(text) == ["a\r\n", "bb\r", "ccc\n", "d"]
    assert offset_at(text, 0, 99) == 1  # before "\r\n", never between \r and \n
    assert offset_at(text, 1, 1) == 4
    assert offset_at(text, 9, 0) == len(text)
    assert apply_edit(text, (1, 2), (2, 0), "") == "a\r\nbbccc\nd"  # joins two lines


def test_reversed_ranges_and_utf16_units():
    assert apply_edit("abc", (0, 2), (0, 1), "X") == "aXc"
    assert apply_edit("😋x\n", (0, 2), (0, 3), "y") == "😋y\n"  # the emoji is 2 UTF-16 units
    assert apply_edit("😋x\n", (0, 1), (0, 1), "y") == "y😋x\n"  # inside it: its start


def test_locate_ignores_lookalikes():
    text = "a\u2028b\x85c\fd\ne"
    assert ctx.locate(text, 1, 0).line_after == "e"
    with pytest.raises(ctx.PositionError, match="2 lines"):
        ctx.locate(text, 2, 0)


def test_the_negotiated_encoding_enum_counts_astral_characters_as_two_units():
    """pygls hands the encoding as lsprotocol's enum, whose str() is "PositionEncodingKind.Utf16":
    read as a name, every emoji counted one unit and edits after it landed a character late."""
    assert encoding_name(types.PositionEncodingKind.Utf16) == "utf-16"
    assert encoding_name(None) == "utf-16" and encoding_name("utf-8") == "utf-8"
    codec = PositionCodec(encoding=types.PositionEncodingKind.Utf16)
    document = Document("untitled:e.py", "x = '😋'  # ok\n", position_codec=codec)
    change(document, (0, 7), (0, 8), "")  # the closing quote: 😋 is units 5-6
    assert document.source == "x = '😋  # ok\n"
