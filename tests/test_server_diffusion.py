"""What only diffusion can do, over LSP with the real server process (pygls' client, tiny model):
live previews of a hole denoising, and several holes filled at once by a code action."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcException

from benchmarks.lsp_client import edit, inline, open_document, running_server, stats
from model.decoding.preview import PLACEHOLDER
from tests.lsp_helpers import HOLES, actions, apply, previewing_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

SOURCE = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"
CANCELLED = -32800


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.network.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("diffusion-model") / "tiny")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tiny_dir):
    settings = {"model": {"path": str(tiny_dir)},
                # one token a step: a hole takes several steps, so there is something to watch
                "completion": {"debounceMs": 0, "preview": True, "tokensPerStep": 1,
                               "checkParse": False}}  # the tiny model's noise
    async with previewing_server(settings) as client:
        yield client


def previews_of(client, uri: str) -> list[dict]:
    return [p for p in client.previews if p["textDocument"]["uri"] == uri]


async def test_previews_show_the_hole_denoising_and_end_with_the_answer(client):
    uri = "untitled:preview.py"
    open_document(client, uri, SOURCE, version=7)
    result = await inline(client, uri, 1, 11)
    seen = previews_of(client, uri)
    assert seen, "no previews"
    final = seen[-1]
    assert final["done"] is True and [p["done"] for p in seen[:-1]] == [False] * (len(seen) - 1)
    answer = result.items[0].insert_text if result.items else ""
    assert final["text"] == answer
    steps = [p["step"] for p in seen]
    assert steps == sorted(set(steps)) and len(seen) <= final["step"]  # at most one a step
    assert all(p["steps"] >= p["step"] for p in seen)
    assert all(p["textDocument"]["version"] == 7 for p in seen)
    assert all(p["position"] == {"line": 1, "character": 11} for p in seen)
    if len(seen) > 1:
        assert PLACEHOLDER in seen[0]["text"]  # after one step of one token, masks remain

    count = len(client.previews)
    if answer:  # typing along the answer is served from the cache: no previews
        edit(client, uri, 8, 1, 11, answer[0])
        again = await inline(client, uri, 1, 12)
        assert again.items and (await stats(client))["cacheHits"] >= 1
        await asyncio.sleep(0.2)
        assert len(client.previews) == count


async def test_no_previews_after_a_cancel(client):
    uri = "untitled:cancel-preview.py"
    open_document(client, uri, SOURCE + "x = " + "1 + " * 200 + "\n")
    params = types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=1, character=11),
        context=types.InlineCompletionContext(
            trigger_kind=types.InlineCompletionTriggerKind.Invoked))
    future = asyncio.ensure_future(client.protocol.send_request_async(
        "textDocument/inlineCompletion", params, msg_id="cancel-preview"))
    for _ in range(500):  # until the first preview arrives
        if previews_of(client, uri):
            break
        await asyncio.sleep(0.01)
    assert previews_of(client, uri), "no preview before the cancel"
    client.protocol.notify("$/cancelRequest", types.CancelParams(id="cancel-preview"))
    with pytest.raises(JsonRpcException) as error:
        await asyncio.wait_for(future, 10)
    assert error.value.code == CANCELLED
    at_answer = len(previews_of(client, uri))
    await asyncio.sleep(0.5)  # the engine would have run many more steps by now
    seen = previews_of(client, uri)
    assert len(seen) == at_answer and not any(p["done"] for p in seen)
    assert (await stats(client))["state"] == "ready"


async def test_previews_are_off_by_default(tiny_dir):
    settings = {"model": {"path": str(tiny_dir)},  # the tiny model's noise: not checked
                "completion": {"debounceMs": 0, "checkParse": False}}
    async with running_server(settings) as quiet:
        seen = []

        @quiet.feature("diffusion/preview")
        def on_preview(params) -> None:
            seen.append(params)

        uri = "untitled:quiet.py"
        open_document(quiet, uri, SOURCE)
        await inline(quiet, uri, 1, 11)
        await asyncio.sleep(0.1)
        assert seen == []


# -- several holes ---------------------------------------------------------------------------


async def test_fill_two_holes_lists_cheaply_and_resolves_to_one_edit(client):
    uri = "untitled:holes.py"
    open_document(client, uri, HOLES, version=3)
    passes = (await stats(client))["forwardPasses"]
    listed = await actions(client, uri, (2, 9), (2, 9))  # empty range: the enclosing function
    assert (await stats(client))["forwardPasses"] == passes  # listing runs no model
    (action,) = listed
    assert action.title == "Fill 2 holes" and action.kind == types.CodeActionKind.RefactorRewrite
    assert action.edit is None and action.data is not None
    resolved = await client.code_action_resolve_async(action)
    assert (await stats(client))["forwardPasses"] > passes
    edits = resolved.edit.changes[uri]
    assert [(e.range.start.line, e.range.start.character, e.range.end.line,
             e.range.end.character) for e in edits] == [(2, 8, 2, 11), (3, 4, 3, 28)]
    assert all(e.new_text.strip() for e in edits)
    (versioned,) = resolved.edit.document_changes
    assert versioned.text_document.version == 3 and versioned.edits == edits
    filled = apply(HOLES, edits)
    assert "..." not in filled and "TODO" not in filled
    assert filled.startswith("def area(w, h):\n    if w < 0:\n        ")
    assert filled.endswith("    return result\n")


async def test_a_document_changed_before_resolving_gets_no_edit(client):
    uri = "untitled:stale.py"
    open_document(client, uri, HOLES)
    (action,) = await actions(client, uri, (0, 0), (5, 0))
    edit(client, uri, 2, 0, 0, "# a new first line\n")
    resolved = await client.code_action_resolve_async(action)
    assert resolved.edit is None


async def test_bad_ranges_and_data_get_nothing_and_the_server_keeps_serving(client):
    uri = "untitled:bad-holes.py"
    open_document(client, uri, HOLES)
    assert await actions(client, uri, (0, 0), (99, 0)) in ([], (), None)  # past the document
    assert await actions(client, uri, (0, 0), (0, 3)) in ([], (), None)  # no marker inside
    assert await actions(client, uri, (0, 0), (5, 0), only=["quickfix"]) in ([], (), None)
    assert await actions(client, "untitled:never-opened.py", (0, 0), (0, 0)) in ([], (), None)
    bogus = types.CodeAction(title="Fill 2 holes", data={"uri": uri, "markers": "nonsense"})
    assert (await client.code_action_resolve_async(bogus)).edit is None
    assert (await stats(client))["state"] == "ready"
