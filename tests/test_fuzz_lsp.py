"""The fast fuzz profile (CI): random valid and broken message sequences against the real
server over stdio; see tests/fuzz_lsp.py for what is checked after every step."""

from __future__ import annotations

import pytest
from hypothesis import given

from tests.fuzz_lsp import Reference, Run, cases, fuzz_settings, run_case, start

FAST_EXAMPLES = 300  # about 10 s on the 2-core VM


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    from model.network.tiny import write_tiny_model

    folder = tmp_path_factory.mktemp("fuzz")
    fuzz = start(folder / "server.log", write_tiny_model(folder / "tiny"))
    yield fuzz
    fuzz.server.close()


def test_fuzz_the_server_over_stdio(run):
    @fuzz_settings(FAST_EXAMPLES)
    @given(cases)
    def case(steps: list[tuple]) -> None:
        run_case(run, steps)

    case()
    assert run.cases >= FAST_EXAMPLES
    assert "Traceback" not in run.server.log()


def test_the_reference_document_follows_the_spec():
    reference = Reference("a\u2028b\r\nc\rd\x85e\n😋f")
    assert reference.line_starts() == [(0, 3), (5, 6), (7, 10), (11, 13)]
    reference.edit((3, 2), (3, 3), "F")  # the emoji counts 2 UTF-16 units
    assert reference.text == "a\u2028b\r\nc\rd\x85e\n😋F"
    reference.edit((1, 9), (0, 1), "")  # reversed; past the end of line 1 is its end
    assert reference.text == "a\rd\x85e\n😋F"
