"""Next edits end to end: a real server process over stdio, asked `textDocument/copilotInlineEdit`
as Copilot clients ask it, with `backend: remote` against a STAND-IN for Inception's
`POST /v1/edit/completions` (loopback; it checks the contract and answers a scripted rewrite of
the editable region), and with the bundled model."""

from __future__ import annotations

import asyncio

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException

from benchmarks.lsp_client import edit, inline, open_document, plain, running_server, stats
from diffusion_contract import edit_wire
from tests.edit_standin import SOURCE, EditStandIn, rename_uses
from tests.lsp_helpers import inline_edit
from tests.remote_standin import KEY

URI = "untitled:shapes.py"


def mercury_options(url: str) -> dict:
    return {"backend": "remote", "completion": {"debounceMs": 0},
            "remote": {"url": url, "api": "mercury", "apiKey": KEY, "timeoutMs": 3000,
                       "retries": 0}}


def applied(text: str, edits: list[dict]) -> str:
    lines = text.split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)

    def at(position: dict) -> int:
        return offsets[position["line"]] + position["character"]

    for item in sorted(edits, key=lambda e: at(e["range"]["start"]), reverse=True):
        start, end = at(item["range"]["start"]), at(item["range"]["end"])
        text = text[:start] + item["text"] + text[end:]
    return text


async def renamed(client) -> str:
    """The user renames `width` to `w` in the signature (letter by letter deleting)."""
    open_document(client, URI, SOURCE)
    edit(client, URI, 2, 0, 10, "", end=(0, 14))  # "width" -> "w"
    await asyncio.sleep(0.3)
    return SOURCE.replace("def area(width,", "def area(w,")


async def test_a_rename_reaches_the_uses_below_through_mercurys_contract():
    async with EditStandIn(rewrite=rename_uses) as remote, running_server(
            mercury_options(remote.url)) as client:
        open_document(client, "untitled:other.py", "import shapes\n\nshapes.area(1, 1)\n")
        text = await renamed(client)
        edits = await inline_edit(client, URI, 2, 0, 10)
        assert applied(text, edits) == text.replace("width *", "w *").replace(
            "a width by", "a w by")
        assert all(e["textDocument"] == {"uri": URI, "version": 2} for e in edits)
        assert all(e["command"]["command"] == "diffusion-lsp.didAcceptNextEdit" for e in edits)
        (request,) = remote.edits()
        assert request.body["model"] == "mercury-edit-2" and request.body["stream"] is False
        content = request.body["messages"][0]["content"]
        prompt = edit_wire.parse(content)
        assert prompt.path == "shapes.py" and prompt.text == text
        assert prompt.region.startswith("def area(w,") and prompt.cursor == 10
        assert "def area(w<|cursor|>, height):" in content
        (diff,) = prompt.history
        assert "-def area(width, height):" in diff and "+def area(w, height):" in diff
        assert [path for path, _ in prompt.snippets] == ["other.py"]
        assert "shapes.area(1, 1)" in prompt.snippets[0][1]


async def test_no_edit_for_an_unchanged_region_a_none_answer_or_a_stale_version():
    answers = iter([lambda p: p.region, lambda p: None])

    def rewrite(prompt: edit_wire.EditPrompt) -> str | None:
        return next(answers)(prompt)

    async with EditStandIn(rewrite=rewrite) as remote, running_server(
            mercury_options(remote.url)) as client:
        text = await renamed(client)
        assert await inline_edit(client, URI, 2, 0, 10) == []  # region comes back unchanged
        assert await inline_edit(client, URI, 2, 0, 10) == []  # "None"
        assert await inline_edit(client, URI, 1, 0, 10) == []  # stale: the document is at 2
        assert len(remote.edits()) == 2
        snapshot = await stats(client)
        assert snapshot["nextEdit"]["stale"] == 1 and snapshot["errors"] == 0
        assert text


async def test_a_suggestion_that_undoes_the_latest_edit_is_never_shown():
    back = lambda prompt: prompt.region.replace("def area(w,", "def area(width,")  # noqa: E731
    async with EditStandIn(rewrite=back) as remote, running_server(
            mercury_options(remote.url)) as client:
        await renamed(client)
        assert await inline_edit(client, URI, 2, 0, 10) == []
        assert len(remote.edits()) == 1


async def test_malformed_requests_get_a_json_rpc_error_and_the_server_keeps_serving():
    async with EditStandIn(rewrite=rename_uses) as remote, running_server(
            mercury_options(remote.url)) as client:
        text = await renamed(client)
        for params in ({"position": {"line": 0, "character": 0}},
                       {"textDocument": {"uri": URI}, "position": {"line": "x", "character": 0}},
                       None):
            with pytest.raises(JsonRpcException) as raised:
                await client.protocol.send_request_async("textDocument/copilotInlineEdit",
                                                         params)
            assert raised.value.code == -32602  # InvalidParams
        assert await inline_edit(client, "untitled:never-opened.py", 1, 0, 0) == []
        assert await inline_edit(client, URI, 2, 99, 0) == []  # past the end: no edit
        # sidekick.nvim adds a `context`; the version may be left out
        edits = await inline_edit(client, URI, None, 0, 10, context={"triggerKind": 2})
        assert applied(text, edits) != text


async def test_shown_accepted_and_rejected_are_counted_per_kind():
    async with EditStandIn(rewrite=rename_uses) as remote, running_server(
            mercury_options(remote.url)) as client:
        caps = client.initialize_result.capabilities
        assert plain(caps.experimental)["inlineEdit"]["method"] == "textDocument/copilotInlineEdit"
        assert "diffusion-lsp.didAcceptNextEdit" in caps.execute_command_provider.commands
        await renamed(client)
        first = (await inline_edit(client, URI, 2, 0, 10))[0]
        # copilot-lsp sends {item: {command}}; then the user applies it (the command runs)
        client.protocol.notify("textDocument/didShowInlineEdit",
                               {"item": {"command": first["command"]}})
        await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command=first["command"]["command"], arguments=first["command"]["arguments"]))
        second = (await inline_edit(client, URI, 2, 0, 10))[0]
        third = (await inline_edit(client, URI, 2, 0, 10))[0]
        client.protocol.notify("textDocument/didShowInlineEdit", {"item": second})
        client.protocol.notify("textDocument/didShowInlineEdit", {"item": third})  # replaces it
        client.protocol.notify("diffusion/didDismiss", {"item": third})
        client.protocol.notify("textDocument/didShowCompletion", {"item": {"insertText": "x"}})
        client.protocol.notify("textDocument/didPartiallyAcceptCompletion",
                               {"item": {"insertText": "x"}, "acceptedLength": 1})
        client.protocol.notify("textDocument/didFocus", {"textDocument": {"uri": URI}})
        feedback = (await stats(client))["feedback"]
        assert feedback["nextEdit"] == {"shown": 3, "accepted": 1, "rejected": 2, "partial": 0,
                                        "acceptanceRate": round(1 / 3, 3)}
        assert feedback["completion"]["shown"] == 0  # an item the server never offered
        assert (await stats(client))["state"] == "ready"


@pytest.mark.parametrize("strategy", ["region", "doubt"])
async def test_the_bundled_model_answers_edits(strategy):
    """With the bundled model (local backend): the answer has the wire's shape, every edit lies
    in the editable region of the current version, and applying it never undoes the rename."""
    async with running_server({"completion": {"debounceMs": 0},
                               "nextEdit": {"strategy": strategy}}) as client:
        text = await renamed(client)
        edits = await inline_edit(client, URI, 2, 0, 10)
        for item in edits:
            assert item["textDocument"] == {"uri": URI, "version": 2}
            assert 0 <= item["range"]["start"]["line"] <= item["range"]["end"]["line"] <= 8
        assert applied(text, edits).startswith("def area(w,")
        snapshot = await stats(client)
        assert snapshot["nextEdit"]["requests"] == 1 and snapshot["errors"] == 0


async def test_inline_completions_carry_a_command_and_their_feedback_is_counted():
    async with EditStandIn(text="a + b") as remote, running_server(
            mercury_options(remote.url)) as client:
        open_document(client, URI, "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n")
        result = await inline(client, URI, 1, 11)
        (item,) = result.items
        assert item.insert_text == "a + b"
        command = item.command
        assert command.command == "diffusion-lsp.didAcceptCompletion"
        client.protocol.notify("textDocument/didShowCompletion",
                               {"item": {"insertText": item.insert_text,
                                         "command": {"title": command.title,
                                                     "command": command.command,
                                                     "arguments": command.arguments}}})
        client.protocol.notify("textDocument/didPartiallyAcceptCompletion",
                               {"item": {"command": {"command": command.command,
                                                     "arguments": command.arguments}},
                                "acceptedLength": 5})
        feedback = (await stats(client))["feedback"]["completion"]
        assert feedback == {"shown": 1, "accepted": 1, "rejected": 0, "partial": 1,
                            "acceptanceRate": 1.0}
        assert remote.completions()[-1].path == "/v1/fim/completions"  # FIM keeps its path


CANCELLED = -32800  # JSON-RPC RequestCancelled


async def test_cancelling_a_next_edit_aborts_the_remote_request():
    async with EditStandIn(rewrite=rename_uses, hang_edits=1) as remote, running_server(
            mercury_options(remote.url)) as client:
        await renamed(client)
        params = {"textDocument": {"uri": URI, "version": 2},
                  "position": {"line": 0, "character": 10}}
        future = asyncio.ensure_future(client.protocol.send_request_async(
            "textDocument/copilotInlineEdit", params, msg_id="edit-1"))
        await asyncio.wait_for(remote.hung.wait(), 5)
        client.protocol.notify("$/cancelRequest", types.CancelParams(id="edit-1"))
        with pytest.raises(JsonRpcException) as error:
            await asyncio.wait_for(future, 5)
        assert error.value.code == CANCELLED
        await asyncio.wait_for(remote.dropped.wait(), 5)  # the HTTP request was aborted
        assert await inline_edit(client, URI, 2, 0, 10)  # and the server keeps serving


async def test_a_newer_next_edit_request_supersedes_an_older_one():
    async with EditStandIn(rewrite=rename_uses, hang_edits=1) as remote, running_server(
            mercury_options(remote.url)) as client:
        await renamed(client)
        old = asyncio.ensure_future(inline_edit(client, URI, 2, 0, 10))
        await asyncio.wait_for(remote.hung.wait(), 5)
        new = await inline_edit(client, URI, 2, 0, 10)
        with pytest.raises(JsonRpcException) as error:
            await old
        assert error.value.code == CANCELLED
        assert new  # the newer one is answered
        assert (await stats(client))["superseded"] == 1


async def test_a_model_that_never_proposes_an_edit_is_not_asked_on_every_request():
    async with EditStandIn(rewrite=lambda prompt: prompt.region) as remote, running_server(
            mercury_options(remote.url)) as client:
        await renamed(client)
        for _ in range(10):
            assert await inline_edit(client, URI, 2, 0, 10) == []
        assert len(remote.edits()) < 10
        snapshot = await stats(client)
        assert snapshot["nextEdit"]["skipped"] == 10 - len(remote.edits())
