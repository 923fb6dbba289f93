"""A completion request as plain values (lsp_server/completion.py and the pure pieces the
completion handlers run: context.snippet_sources, postprocess.surroundings, holes.offer /
holes_job): whether a request is answered and why not, the job, the surroundings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from lsp_server import completion, holes
from lsp_server import context as ctx
from lsp_server.completion import Refusal, admit, completion_job
from lsp_server.postprocess import BELOW_LINES, surroundings
from lsp_server.settings import CompletionSettings, HolesSettings, SamplerSettings, Settings


@dataclass
class Doc:
    source: str
    language_id: str | None = "python"
    version: int = 1


URI = "file:///w/a.py"
TEXT = "def f(x):\n    return x\n"


def admitted(document, settings=None, ready=True, line=1, character=11, encoding="utf-16"):
    return admit(URI, document, settings or Settings(), ready, line, character, encoding)


def test_an_open_document_at_a_real_position_gives_the_cursor():
    cursor = admitted(Doc(TEXT))
    assert cursor == ctx.locate(TEXT, 1, 11)
    assert cursor.line_before == "    return " and cursor.line_after == "x"


def test_the_cursor_is_read_in_the_negotiated_encoding():
    text = "s = '😀' + \n"
    assert admitted(Doc(text), line=0, character=9).offset == 8  # utf-16: the emoji is two
    assert admitted(Doc(text), line=0, character=9, encoding="utf-32").offset == 9


def test_a_document_that_is_not_open_is_rejected_and_counted():
    refusal = admitted(None)
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.counter, refusal.tell_user) == (
        completion.NOT_OPEN, "rejected", False)
    assert URI in refusal.detail


@pytest.mark.parametrize("settings", [Settings(disabled_languages=["python"]),
                                      Settings(enable=False)])
def test_a_disabled_language_is_refused_quietly_and_not_counted(settings):
    refusal = admitted(Doc(TEXT), settings, ready=False)  # disabled wins over not ready
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.counter, refusal.level) == (
        completion.DISABLED, None, logging.DEBUG)


def test_other_languages_stay_enabled():
    assert isinstance(admitted(Doc(TEXT, "rust"), Settings(disabled_languages=["python"])),
                      ctx.Cursor)


def test_a_model_not_ready_is_counted_as_not_ready():
    refusal = admitted(Doc(TEXT), ready=False)
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.counter, refusal.level) == (
        completion.NOT_READY, "notReady", logging.DEBUG)


def test_a_document_too_large_is_told_to_the_user(monkeypatch):
    monkeypatch.setattr(completion, "MAX_DOCUMENT_CHARS", len(TEXT) - 1)
    refusal = admitted(Doc(TEXT))
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.counter, refusal.tell_user) == (
        completion.TOO_LARGE, "rejected", True)
    assert refusal.detail == f"{URI} is too large for completions ({len(TEXT)} characters)"
    monkeypatch.setattr(completion, "MAX_DOCUMENT_CHARS", len(TEXT))
    assert isinstance(admitted(Doc(TEXT)), ctx.Cursor)


@pytest.mark.parametrize("line, character", [(5, 0), (-1, 0), (0, -2)])
def test_a_position_not_in_the_document_is_rejected(line, character):
    refusal = admitted(Doc(TEXT), line=line, character=character)
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.counter) == (completion.NO_SUCH_POSITION, "rejected")


def test_text_that_looks_binary_near_the_cursor_is_rejected():
    refusal = admitted(Doc("x = 1\x00\n" + TEXT), line=2, character=11)
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.counter) == (completion.BINARY, "rejected")
    far = "\x00" + "y = 2\n" * (completion.BINARY_WINDOW // 6 + 1) + TEXT
    assert isinstance(admitted(Doc(far), line=far.count("\n") - 1, character=11), ctx.Cursor)


def test_the_job_of_a_multi_line_and_a_one_line_completion():
    sampler = SamplerSettings(temperature=0.5)
    options = CompletionSettings(max_tokens=48, max_tokens_single_line=12, stop=["\n\n"],
                                 threshold=0.8, tokens_per_step=2, sampler=sampler)
    context = ctx.Context("def f():\n    ", "\n", 0)

    def report(*_):
        return None

    multi = completion_job(context, True, options, URI, report)
    assert (multi.prefix, multi.suffix, multi.max_tokens, multi.single_line) == (
        "def f():\n    ", "\n", 48, False)
    assert (multi.stop, multi.threshold, multi.tokens_per_step, multi.sampler) == (
        ("\n\n",), 0.8, 2, sampler)
    assert (multi.document, multi.on_step) == (URI, report)
    single = completion_job(context, False, options, URI)
    assert (single.max_tokens, single.single_line, single.on_step) == (12, True, None)


def test_surroundings_see_the_lines_below_and_the_indentation_step():
    text = "if a:\n\tb = \n" + "".join(f"\tc{i} = {i}\n" for i in range(20))
    cursor = ctx.locate(text, 1, 5)
    where = surroundings(text, cursor, True, 7)
    assert (where.line_before, where.line_after) == ("\tb = ", "")
    assert where.below == tuple(f"\tc{i} = {i}" for i in range(BELOW_LINES))
    assert (where.indent_unit, where.multiline, where.max_lines) == ("\t", True, 7)
    last = ctx.locate("x = ", 0, 4)
    assert surroundings("x = ", last, False, 12).below == ()


def test_snippet_sources_are_the_other_recent_documents_of_the_language():
    documents = {"file:///w/a.py": Doc("a"), "file:///w/b.py": Doc("b"),
                 "file:///w/c.rs": Doc("c", "rust"), "file:///w/d.py": Doc("d")}
    recent = ["file:///w/d.py", "file:///w/a.py", "file:///w/gone.py", "file:///w/c.rs",
              "file:///w/b.py"]
    assert ctx.snippet_sources(URI, "python", recent, documents) == [("d.py", "d"),
                                                                     ("b.py", "b")]


def test_the_hole_action_is_offered_for_the_markers_up_to_the_limit():
    text = "def f():\n    ...\n\ndef g():\n    # TODO\n"
    data = holes.offer(URI, 3, text, (0, len(text)), Settings())
    assert data is not None and (data.uri, data.version, data.texts) == (URI, 3, ["...", "# TODO"])
    assert [text[start:end] for start, end in data.markers] == data.texts
    assert holes.offer(URI, 3, text, (0, len(text)),
                       Settings(holes=HolesSettings(max_holes=1))) is None
    assert holes.offer(URI, 3, "def f():\n    return 1\n", (0, 20), Settings()) is None
    patterns = Settings(holes=HolesSettings(patterns=[r"\?\?\?"]))
    assert holes.offer(URI, 3, "x = ???\n", (0, 8), patterns).texts == ["???"]


def test_the_holes_job_cuts_the_outer_pieces_and_keeps_each_hole_budget():
    text = "a = 1\n" * 50 + "def f():\n    ...\n    return 2\n"
    data = holes.offer(URI, 1, text, (0, len(text)), Settings())
    settings = Settings(holes=HolesSettings(max_tokens=9))
    settings.context.prefix_tokens = 10
    job = holes.holes_job(text, data, lambda piece: len(piece.split()), settings)
    assert job.markers == ("...",) and job.max_tokens == 9
    assert job.pieces[0].endswith("def f():\n    ") and len(job.pieces[0].split()) <= 10
    assert job.pieces[1] == "\n    return 2\n"


def test_the_server_refuses_in_one_place_counting_logging_and_telling(caplog):
    from lsp_server.main import make_server

    server = make_server()
    caplog.set_level(logging.DEBUG, logger="diffusion_lsp")
    server.refuse(Refusal(completion.NO_SUCH_POSITION, "line 9 is past the end"))
    server.refuse(Refusal(completion.NOT_READY, "not ready", counter="notReady",
                          level=logging.DEBUG))
    server.refuse(Refusal(completion.DISABLED, "off", counter=None, level=logging.DEBUG))
    server.refuse(Refusal(completion.TOO_LARGE, "a.py is too large", tell_user=True))
    assert {name: server.stats.counts[name] for name in ("rejected", "notReady")} == {
        "rejected": 2, "notReady": 1}
    assert server.reported == {"a.py is too large"}  # told once, in the editor's log panel
    logged = [(record.levelno, record.getMessage()) for record in caplog.records
              if record.name == "diffusion_lsp"]
    assert (logging.INFO, "no items: line 9 is past the end") in logged
    assert (logging.DEBUG, "no items: off") in logged
    assert (logging.WARNING, "a.py is too large") in logged


async def test_a_full_engine_queue_answers_nothing_quietly_and_counts_busy():
    """A burst beyond the engine's queue (model.engine.QueueFull) is no error: no items, counted
    as `busy`, nothing told to the user; a real failure still is an error, told once."""
    from lsp_server.backends.local import engine_failure
    from lsp_server.main import make_server
    from model.engine import QueueFull

    server = make_server()

    async def raises(error):
        raise error

    busy = engine_failure(QueueFull(64), "cpu")
    assert busy.kind == "busy"
    assert await server.under_policy(raises(busy), None, "completion") is None
    assert server.stats.snapshot()["busy"] == 1 and server.stats.snapshot()["errors"] == 0
    assert not server.reported
    failed = engine_failure(RuntimeError("boom"), "cpu")
    assert await server.under_policy(raises(failed), None, "completion") is None
    assert server.stats.snapshot()["errors"] == 1 and server.reported
