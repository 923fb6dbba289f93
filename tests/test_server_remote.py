"""The language server with `backend: remote`, end to end: a real server process over stdio
asks a STAND-IN for a Mercury-shaped FIM API (tests/remote_standin.py) for its completions."""

from __future__ import annotations

import asyncio
import socket

import pytest

from benchmarks.lsp_client import inline, open_document, running_server, stats
from tests.lsp_helpers import remote_options
from tests.remote_standin import StandIn

SOURCE = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_completions_come_from_the_remote():
    async with StandIn(text="a + b") as remote, running_server(
            remote_options(remote.url)) as client:
        assert (await stats(client))["state"] == "ready"
        open_document(client, "untitled:remote.py", SOURCE)
        result = await inline(client, "untitled:remote.py", 1, 11)
        assert [item.insert_text for item in result.items] == ["a + b"]
        request = remote.completions()[-1]
        assert request.body["prompt"].endswith("def add(a, b):\n    return ")
        assert request.body["suffix"].startswith("\n\n\nprint(add(1, 2))")


async def test_a_refused_key_is_shown_to_the_user():
    async with StandIn() as remote, running_server(
            remote_options(remote.url, key="wrong-key")) as client:
        snapshot = await stats(client)
        assert snapshot["state"] == "error"
        shown = " ".join(message.message for message in client.messages)
        assert "refused the API key" in shown and "wrong-key" not in shown
        open_document(client, "untitled:a.py", SOURCE)
        assert (await inline(client, "untitled:a.py", 1, 11)).items == ()


@pytest.mark.parametrize("timeout_ms", [1500])
async def test_a_remote_that_is_down_is_reported_and_the_server_keeps_serving(timeout_ms):
    url = f"http://127.0.0.1:{closed_port()}"
    async with running_server(remote_options(url, timeout_ms=timeout_ms)) as client:
        open_document(client, "untitled:down.py", SOURCE)
        # answered (a hang would fail the guard), with no items
        answer = await asyncio.wait_for(inline(client, "untitled:down.py", 1, 11), 60)
        assert answer.items == ()
        snapshot = await stats(client)
        assert snapshot["errors"] == 1 and snapshot["state"] == "ready"
        assert any("unavailable" in (status.get("message") or "") for status in client.statuses)
        assert any("completion failed" in m.message for m in client.log_messages)
