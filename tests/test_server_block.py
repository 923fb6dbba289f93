"""The block-diffusion families over LSP, end to end: the real server process (pygls' client) on
tiny Stable-DiffCoder and Fast-dLLM v2 checkpoints in their published formats: completions with
previews filling blocks left to right, typing along (the exact prompt cache), several holes,
next edits."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from benchmarks.lsp_client import edit, inline, open_document, stats
from tests.edit_standin import SOURCE as EDIT_SOURCE
from tests.lsp_helpers import HOLES, actions, apply, inline_edit, previewing_server

from .fixtures_block import write_stable_diffcoder
from .fixtures_fast_dllm import write_fast_dllm_v2

pytestmark = pytest.mark.asyncio(loop_scope="module")

SOURCE = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"


# special tokens of each family's tokenizer look like these; none may reach a completion
SPECIAL_MARKS = ("<[", "<|", "|<")


@pytest.fixture(scope="module", params=["stable-diffcoder", "fast-dllm-v2"])
def block_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param) / "m"
    if request.param == "fast-dllm-v2":
        return write_fast_dllm_v2(root, stop_boost=3.0)
    return write_stable_diffcoder(root, eos_boost=4.0)


def plain(text: str) -> bool:
    return not any(mark in text for mark in SPECIAL_MARKS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(block_dir):
    settings = {"model": {"path": str(block_dir), "device": "cpu"},
                "completion": {"debounceMs": 0, "preview": True, "maxTokens": 12,
                               "checkParse": False}}  # the tiny model's noise
    async with previewing_server(settings) as client:
        yield client


async def test_completions_and_previews_fill_blocks_left_to_right(client):
    uri = "untitled:block.py"
    open_document(client, uri, SOURCE, version=1)
    result = await inline(client, uri, 1, 11)
    seen = [p for p in client.previews if p["textDocument"]["uri"] == uri]
    answer = result.items[0].insert_text if result.items else ""
    assert plain(answer)  # no special token in a completion
    assert seen and seen[-1]["done"] is True and seen[-1]["text"] == answer
    steps = [p["step"] for p in seen]
    assert steps == sorted(set(steps))
    snapshot = await stats(client)
    assert snapshot["state"] == "ready" and snapshot["errors"] == 0


async def test_typing_along_keeps_serving(client):
    uri = "untitled:typing.py"
    open_document(client, uri, SOURCE, version=1)
    await inline(client, uri, 1, 11)
    edit(client, uri, 2, 1, 11, "a")
    await inline(client, uri, 1, 12)
    edit(client, uri, 3, 1, 12, " +")
    await inline(client, uri, 1, 14)
    snapshot = await stats(client)
    assert snapshot["state"] == "ready" and snapshot["errors"] == 0


async def test_several_holes_are_filled_in_turn(client):
    uri = "untitled:block-holes.py"
    open_document(client, uri, HOLES, version=3)
    (action,) = await actions(client, uri, (2, 9), (2, 9))
    resolved = await client.code_action_resolve_async(action)
    edits = resolved.edit.changes[uri]
    assert len(edits) == 2
    filled = apply(HOLES, edits)
    assert "..." not in filled and "TODO" not in filled and plain(filled)
    assert filled.endswith("    return result\n")


async def test_next_edits_answer(client):
    uri = "untitled:block-edit.py"
    open_document(client, uri, EDIT_SOURCE)
    edit(client, uri, 2, 0, 10, "", end=(0, 14))
    await asyncio.sleep(0.2)
    edits = await inline_edit(client, uri, 2, 0, 10)
    assert isinstance(edits, list)
    assert all(plain(item["text"]) for item in edits)
    assert (await stats(client))["errors"] == 0
