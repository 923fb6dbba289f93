"""Broken parts, each through the real server process (pygls' client) on the tiny model: the user
gets one clear message, the server keeps answering (no items), it never crashes or hangs.

Engine faults are injected by `tests/fault_injection.py` (the real server, with one forward
pass or worker step made to fail); model files are really broken on disk; the remote is a real
HTTP stand-in that hangs or answers garbage; the log file is /dev/full.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from lsprotocol import types

from benchmarks.lsp_client import inline, open_document, running_server, stats, wait_ready
from tests import fault_injection as faults
from tests.remote_standin import KEY, StandIn

pytestmark = pytest.mark.asyncio(loop_scope="module")

SOURCE = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"
CURSOR = (1, 11)  # after "return "
ANSWER_S = 60.0  # a guard: a hang fails the test instead of the suite (never a measurement)
# short holes: the tiny model's text is noise, and the 2-core CI machine is shared
# the tiny model's text is noise, which the parse check would hold back: these tests are
# about faults, so it is off
FAST = {"debounceMs": 0, "maxTokens": 8, "maxTokensSingleLine": 8, "tokensPerStep": 4,
        "checkParse": False}


RELOAD_POLLS = 600  # a reload on a busy 2-core machine can take many seconds


def options(model_dir, **extra) -> dict:
    return {"model": {"path": str(model_dir)}, "completion": FAST, **extra}


def texts(messages) -> list[str]:
    return [message.message for message in messages]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.network.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("faults-model") / "tiny")


async def ask(client, uri: str, text: str, line: int = CURSOR[0], character: int = CURSOR[1]):
    """Open `uri` with `text`, ask for an inline completion and close it again (so that it is
    not another hole's snippet); returns the items."""
    open_document(client, uri, text)
    result = await asyncio.wait_for(inline(client, uri, line, character), ANSWER_S)
    client.text_document_did_close(types.DidCloseTextDocumentParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))
    return result.items


def with_marker(marker: str) -> str:
    return f"# {marker}\n{SOURCE}"


# -- the engine ----------------------------------------------------------------------------------


async def test_engine_faults_give_one_message_and_the_server_keeps_serving(tiny_dir):
    async with running_server(options(tiny_dir), module="tests.fault_injection") as client:
        # a forward pass raising: no items, one log line for the user, later holes fine
        for attempt in range(2):
            items = await ask(client, f"untitled:step{attempt}.py",
                              with_marker(faults.STEP_ERROR), CURSOR[0] + 1)
            assert items == ()
        failed = [m for m in texts(client.log_messages) if "injected fault in the forward" in m]
        assert len(failed) == 1, texts(client.log_messages)
        assert "completion failed: the model failed (RuntimeError" in failed[0]
        assert "injected fault" in client.statuses[-1]["message"], list(client.statuses)
        items = await ask(client, "untitled:fine.py", SOURCE)
        assert items
        assert client.statuses[-1]["message"].startswith("ready")  # the failure is over

        # CUDA out of memory from the forward: one line, memory freed, the next hole is served
        items = await ask(client, "untitled:oom.py", with_marker(faults.OUT_OF_MEMORY),
                          CURSOR[0] + 1)
        assert items == ()
        oom = [m for m in texts(client.log_messages) if "out of memory" in m]
        assert len(oom) == 1 and "\n" not in oom[0], oom
        snapshot = await stats(client)
        assert snapshot["outOfMemory"] == 1 and snapshot["state"] == "ready"
        items = await ask(client, "untitled:after-oom.py", SOURCE + "x = ")
        assert items

        # the engine's worker dying: the hole in flight is answered (no items), the user is
        # told once however often it happens, the worker restarts and serves the next holes
        for attempt in range(2):
            items = await ask(client, f"untitled:dies{attempt}.py",
                              with_marker(faults.WORKER_DIES), CURSOR[0] + 1)
            assert items == ()
            items = await ask(client, f"untitled:healed{attempt}.py", SOURCE + f"y{attempt} = ")
            assert items, f"no completion after restart {attempt + 1}"
        restarted = [m for m in texts(client.messages) if "was restarted" in m]
        assert len(restarted) == 1, texts(client.messages)
        snapshot = await stats(client)
        assert snapshot["engineRestarts"] == 2 and snapshot["state"] == "ready", snapshot

        # past the restarts a minute allows (3), the engine stops: one pop-up that says what to
        # do, and every later hole is still answered (no items)
        for attempt in (2, 3):
            items = await ask(client, f"untitled:dies{attempt}.py",
                              with_marker(faults.WORKER_DIES), CURSOR[0] + 1)
            assert items == ()
        snapshot = await stats(client)
        assert snapshot["state"] == "error" and snapshot["engineRestarts"] == 3, snapshot
        popups = [m for m in texts(client.messages) if "engine stopped" in m]
        assert len(popups) == 1 and "restart the server" in popups[0], texts(client.messages)
        assert await ask(client, "untitled:after-death.py", SOURCE) == ()

        # reloading the model (any model setting) brings completions back
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"diffusionLsp": options(tiny_dir, model={"path": str(tiny_dir),
                                                               "threads": 1})}))
        for _ in range(RELOAD_POLLS):
            if (await stats(client))["state"] == "ready":
                break
            await asyncio.sleep(0.1)
        items = await ask(client, "untitled:reloaded.py", SOURCE)
        assert items


# -- the model's files ---------------------------------------------------------------------------


def broken_models(good, root) -> dict[str, tuple]:
    """Copies of the tiny model, each broken one way, with a phrase the message must hold."""
    weights = good / "model.safetensors"
    config = json.loads((good / "config.json").read_text())

    def copy(name):
        shutil.copytree(good, root / name)
        return root / name

    corrupt = copy("corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    truncated = copy("truncated")
    (truncated / "model.safetensors").write_bytes(
        weights.read_bytes()[: weights.stat().st_size // 2])
    no_tokenizer = copy("no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    bad_tokenizer = copy("bad-tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    wrong_shape = copy("wrong-shape")
    (wrong_shape / "config.json").write_text(json.dumps(
        {**config, "hidden_size": config["hidden_size"] * 2}))
    return {"corrupt": (corrupt, "cannot read weights"),
            "truncated": (truncated, "cannot read weights"),
            "no-tokenizer": (no_tokenizer, "no tokenizer.json"),
            "bad-tokenizer": (bad_tokenizer, "cannot read the tokenizer"),
            "wrong-shape": (wrong_shape, "do not fit config.json")}


async def test_broken_model_files_give_one_message_each_and_no_items(tiny_dir, tmp_path):
    broken = broken_models(tiny_dir, tmp_path)
    first_dir, _ = broken["corrupt"]
    async with running_server(options(first_dir)) as client:
        for name, (model_dir, phrase) in broken.items():
            if model_dir != first_dir:
                client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                    settings={"diffusionLsp": options(model_dir)}))
                await asyncio.sleep(0.2)
                await wait_ready(client, 60)
            snapshot = await stats(client)
            assert snapshot["state"] == "error", (name, snapshot)
            shown = [m for m in texts(client.messages) if str(model_dir) in m]
            assert len(shown) == 1, (name, texts(client.messages))
            assert phrase in shown[0] and "\n" not in shown[0], (name, shown[0])
            items = await ask(client, f"untitled:{name}.py", SOURCE)
            assert items == ()
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"diffusionLsp": options(tiny_dir)}))
        await asyncio.sleep(0.2)
        assert (await wait_ready(client, 60))["state"] == "ready"
        items = await ask(client, "untitled:repaired.py", SOURCE)
        assert items


# -- the remote backend --------------------------------------------------------------------------


def remote_options(url: str, timeout_ms: int = 1500) -> dict:
    return {"backend": "remote", "completion": FAST,
            "remote": {"url": url, "apiKey": KEY, "timeoutMs": timeout_ms, "retries": 0}}


class GarbageStandIn(StandIn):
    """The stand-in, answering completions with 200 and a body that is not a completion."""

    def _answer(self, seen):
        status, body, headers = super()._answer(seen)
        if status == 200 and seen.path.endswith("completions"):
            return 200, {"choices": "not a list", "usage": None}, headers
        return status, body, headers


async def test_a_hanging_remote_is_given_up_at_the_deadline():
    async with StandIn(plan=["hang"] * 3) as remote, running_server(
            remote_options(remote.url)) as client:
        items = await ask(client, "untitled:hang.py", SOURCE)
        assert items == ()  # answered at the deadline; a hang would fail `ask`'s guard
        shown = [m for m in texts(client.log_messages) if "no answer from" in m]
        assert len(shown) == 1, texts(client.log_messages)
        assert len(remote.completions()) == 1  # given up at the deadline: no retry after it
        assert (await stats(client))["state"] == "ready"


async def test_a_remote_answering_garbage_gives_one_message():
    async with GarbageStandIn() as remote, running_server(
            remote_options(remote.url)) as client:
        for attempt in range(2):
            items = await ask(client, f"untitled:garbage{attempt}.py", SOURCE)
            assert items == ()
        shown = [m for m in texts(client.log_messages) if "unreadable answer" in m]
        assert len(shown) == 1, texts(client.log_messages)
        assert (await stats(client))["errors"] == 2


# -- the log file --------------------------------------------------------------------------------


async def test_a_full_disk_under_the_log_file_is_reported_once(tiny_dir, capfd):
    async with running_server(options(tiny_dir), extra_args=(
            "--log-file", "/dev/full")) as client:
        for index in range(3):
            items = await ask(client, f"untitled:log{index}.py", SOURCE)
            assert items
        shown = [m for m in texts(client.messages) if "/dev/full" in m]
        assert len(shown) == 1, texts(client.messages)
        assert "No space left on device" in shown[0]
    err = capfd.readouterr().err
    assert "--- Logging error ---" not in err and "Traceback" not in err, err[-2000:]
    lines = err.splitlines()
    assert sum(line.startswith("cannot write the log file /dev/full") for line in lines) == 1
    assert any(line.endswith("INFO diffusion_lsp: warming up") for line in lines)  # goes on
