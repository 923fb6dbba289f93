"""No junk offered: a completion below the model's confidence floor, or one that turns a file that
parsed into one that does not, is not offered (and counted in `diffusion/stats`); the bundled
model says it is a preview. Pure checks first, then the server over stdio (a stand-in remote
that answers junk, the bundled model on HumanEval-infilling's held-out holes)."""

from __future__ import annotations

import pytest

from benchmarks import confidence as bench
from benchmarks.lsp_client import inline, open_document, running_server, stats
from benchmarks.report import EVAL_DATA
from diffusion_contract.options import InfillOptions
from lsp_server import parse_check, suppress
from lsp_server.parse_check import breaks_parse, inserted, parses
from model.catalog.paths import MIN_CONFIDENCE_KEY, bundled_model_path, min_confidence
from model.decoding.sampler import infill
from tests.lsp_helpers import remote_options
from tests.remote_standin import StandIn

FUNCTION = "def mean(values):\n    total = sum(values)\n    \n    return total / len(values)\n"
CURSOR = FUNCTION.index("    \n") + 4  # the blank line's end, inside the function
JUNK = "):"
# documents the tests make themselves (no ../shared needed): the cursor at "|"
DOCUMENTS = [
    "def add(a, b):\n    return |\n\n\nprint(add(1, 2))\n",
    "def is_even(n):\n    |\n    return result\n",
    "import os\n\n\ndef files(path):\n    names = []\n    for name in os.listdir(path):\n"
    "        |\n    return names\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        |\n",
    "def mean(values):\n    total = sum(values)\n    |\n    return total / len(values)\n",
]


def test_python_and_tree_sitter_languages_are_judged_and_others_are_not():
    assert parses("x = 1\n", "python") is True and parses("x = (\n", "python") is False
    assert parses("const x = 1;\n", "javascript") is True
    assert parses("function f( {\n", "javascript") is False
    assert parses("fn main() { let x = ; }\n", "rust") is False
    assert parses("anything at all", "markdown") is None and parses("x", None) is None


def test_only_a_file_that_parsed_and_stops_parsing_is_judged_broken():
    assert breaks_parse(FUNCTION, inserted(FUNCTION, CURSOR, JUNK), "python")
    assert not breaks_parse(FUNCTION, inserted(FUNCTION, CURSOR, "total += 0"), "python")
    typing = FUNCTION.replace("    \n", "    return a +\n")  # mid-edit: did not parse before
    assert not breaks_parse(typing, inserted(typing, typing.index("+") + 1, JUNK), "python")
    assert not breaks_parse("x = (\n", "x = ((\n", "python")


def test_the_reasons_a_completion_is_not_offered():
    def problem(completion: str, confidence: float | None, floor: float = 0.3,
                check: bool = True) -> str | None:
        return suppress.completion_problem(FUNCTION, CURSOR, completion, "python",
                                           confidence, floor, check)

    assert problem("total += 0", 0.9) is None
    assert problem("total += 0", 0.1) == suppress.LOW_CONFIDENCE
    assert problem("total += 0", None) is None  # a backend that does not say: no floor
    assert problem(JUNK, 0.9) == suppress.BREAKS_PARSE
    assert problem(JUNK, 0.9, check=False) is None
    assert problem("", 0.0) is None


def test_a_completion_knows_how_sure_the_model_was(tiny_model):
    result = infill(tiny_model, "def f(x):\n    return ", "\n", InfillOptions(max_tokens=8))
    assert result.text and result.confidence is not None
    assert 0.0 <= result.confidence.lowest <= result.confidence.mean <= 1.0


def test_the_bundled_model_carries_its_calibrated_floor():
    bundled = bundled_model_path()
    if bundled is None:
        pytest.skip("no bundled model")
    assert 0.0 < min_confidence(bundled) < 1.0
    assert MIN_CONFIDENCE_KEY in (bundled / "config.json").read_text()


async def test_a_completion_that_breaks_the_file_is_not_offered_and_counted():
    async with StandIn(text=JUNK) as remote, running_server(
            remote_options(remote.url)) as client:
        open_document(client, "untitled:mean.py", FUNCTION)
        answer = await inline(client, "untitled:mean.py", 2, 4)
        assert list(answer.items) == []
        snapshot = await stats(client)
        assert snapshot["suppressed"] == {"lowConfidence": 0, "breaksParse": 1}
    async with StandIn(text=JUNK) as remote, running_server(
            remote_options(remote.url) | {"completion": {"debounceMs": 0,
                                                         "checkParse": False}}) as client:
        open_document(client, "untitled:mean.py", FUNCTION)
        answer = await inline(client, "untitled:mean.py", 2, 4)
        assert [item.insert_text for item in answer.items] == [JUNK]  # the check, switched off


async def test_the_bundled_models_first_completion_says_it_is_a_preview_once():
    async with running_server({"completion": {"debounceMs": 0}}) as client:
        assert not [m for m in client.messages if "PREVIEW" in m.message]
        for index, document in enumerate(DOCUMENTS[:3]):
            text = document.replace("|", "")
            before = document[:document.index("|")].split("\n")
            open_document(client, f"untitled:d{index}.py", text)
            await inline(client, f"untitled:d{index}.py", len(before) - 1, len(before[-1]))
        said = [m.message for m in client.messages if "PREVIEW" in m.message]
        assert len(said) == 1 and "diffusion-lsp pull Open-dCoder-0.5B" in said[0]


async def test_nothing_below_the_floor_is_offered():
    async with running_server({"completion": {"debounceMs": 0,
                                              "minConfidence": 0.9999}}) as client:
        for index, document in enumerate(DOCUMENTS):
            text = document.replace("|", "")
            before = document[:document.index("|")].split("\n")
            open_document(client, f"untitled:d{index}.py", text)
            answer = await inline(client, f"untitled:d{index}.py", len(before) - 1,
                                  len(before[-1]))
            assert list(answer.items) == []
        assert (await stats(client))["suppressed"]["lowConfidence"] >= 1


def held_out_documents(limit: int) -> list[tuple[str, int]]:
    """(document, cursor offset): this file's documents, and HumanEval-infilling's held-out
    holes where ../shared has them (the floor was calibrated on the other half)."""
    documents = [(d.replace("|", ""), d.index("|")) for d in DOCUMENTS]
    if (EVAL_DATA / "HumanEval-SingleLineInfilling.jsonl.gz").exists():
        _, held_out = bench.halves(bench.load_holes("single-line", 2 * limit))
        for hole in held_out:
            prefix, suffix = bench.typing_the_line(hole)
            documents.append((prefix + suffix, len(prefix)))
    return documents


@pytest.mark.slow
async def test_the_bundled_model_offers_nothing_that_breaks_a_file_on_held_out_holes():
    broken, offered = [], 0
    documents = held_out_documents(40)
    async with running_server({"completion": {"debounceMs": 0}}) as client:
        for index, (text, cursor) in enumerate(documents):
            lines = text[:cursor].split("\n")
            open_document(client, f"untitled:held-{index}.py", text)
            answer = await inline(client, f"untitled:held-{index}.py", len(lines) - 1,
                                  len(lines[-1]))
            for item in answer.items:
                offered += 1
                if breaks_parse(text, inserted(text, cursor, item.insert_text), "python"):
                    broken.append((text[max(0, cursor - 60):cursor], item.insert_text))
        snapshot = await stats(client)
    assert broken == []
    assert snapshot["completed"] + snapshot["empty"] + snapshot["cacheHits"] >= len(documents)
    assert parse_check.judged("python")
