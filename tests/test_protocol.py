"""The real server process fed raw JSON-RPC bytes: what a broken or hostile client sends.

Every request whose id can be read gets exactly one response, anything else unreadable an
error with `"id": null`; the server's copy of a document follows LSP's line ends; a problem
is one log line; `serve --tcp` serves one client at a time, each with fresh state.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsp_server.transport import STALL_S
from tests.raw_lsp import SERVE, FrameReader, RawServer, encode, frame

LOOKALIKES = "\u2028\u2029\x85\f\v\x1c\x1d\x1e"
SOURCE = "def add(a, b):\n    return \n\n\nprint(add(1, 2))\n"
INVALID_REQUEST, PARSE_ERROR, INVALID_PARAMS = -32600, -32700, -32602


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.network.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("protocol-model") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("protocol-log") / "server.log"
    with RawServer(log_path=log) as raw:
        raw.initialize({"model": {"path": str(tiny_dir)},  # the tiny model writes noise:
                        "completion": {"debounceMs": 0, "checkParse": False}})  # not checked
        assert raw.wait_ready()["state"] == "ready"
        yield raw


def open_doc(server: RawServer, uri: str, text: str) -> None:
    server.notify("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": "python", "version": 1, "text": text}})


def document(server: RawServer, uri: str) -> str | None:
    result = server.request("diffusion/document", {"uri": uri})["result"]
    return None if result is None else result["text"]


def inline(server: RawServer, uri: str, line: int, character: int) -> list:
    answer = server.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
        "context": {"triggerKind": 2}}, timeout=60)
    return answer["result"]["items"]


def log_lines_since(server: RawServer, mark: int) -> list[str]:
    time.sleep(0.3)  # the log is written after the response
    return server.log().splitlines()[mark:]


# -- documents -------------------------------------------------------------------------------


def test_edits_below_line_separator_lookalikes_keep_the_document_in_sync(server):
    uri = "untitled:lookalikes.py"
    text = "".join(f"s{i} = 'a{char}b'\n" for i, char in enumerate(LOOKALIKES)) + "x = 1\n"
    open_doc(server, uri, text)
    last = len(LOOKALIKES)  # the line of "x = 1"
    server.notify("textDocument/didChange", {
        "textDocument": {"uri": uri, "version": 2},
        "contentChanges": [{"range": {"start": {"line": last, "character": 4},
                                      "end": {"line": last, "character": 5}}, "text": "42"}]})
    assert document(server, uri) == text.replace("x = 1", "x = 42")


def test_an_edit_after_an_emoji_counts_it_as_two_utf16_units(server):
    uri = "untitled:emoji.py"
    open_doc(server, uri, "x = '😋'  # ok\n")
    server.notify("textDocument/didChange", {
        "textDocument": {"uri": uri, "version": 2},
        "contentChanges": [{"range": {"start": {"line": 0, "character": 7},
                                      "end": {"line": 0, "character": 8}}, "text": ""}]})
    assert document(server, uri) == "x = '😋  # ok\n"


def test_cr_only_documents_get_completions_past_the_first_line(server):
    uri = "untitled:mac.py"
    open_doc(server, uri, SOURCE.replace("\n", "\r"))
    before = server.request("diffusion/stats")["result"]["rejected"]
    assert inline(server, uri, 1, 11)
    assert server.request("diffusion/stats")["result"]["rejected"] == before


def test_a_percent_escaped_uri_is_found(server):
    uri = "file:///tmp/with%20space.py"
    open_doc(server, uri, SOURCE)
    assert document(server, uri) == SOURCE
    assert inline(server, uri, 1, 11)


# -- JSON-RPC ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "answer_id", "code"), [
    ({"jsonrpc": "1.0", "id": "v1", "method": "diffusion/stats"}, "v1", INVALID_REQUEST),
    ({"id": "no-version", "method": "diffusion/stats"}, "no-version", INVALID_REQUEST),
    ({"jsonrpc": "2.0", "id": {"an": "object"}, "method": "diffusion/stats"}, None,
     INVALID_REQUEST),
    ([{"jsonrpc": "2.0", "id": "batch", "method": "diffusion/stats"}], None, INVALID_REQUEST),
])
def test_malformed_requests_get_an_error_response(server, message, answer_id, code):
    before = len(server.responses(answer_id))
    server.send(message)
    server.request("diffusion/stats")  # answered after the one before
    answers = server.responses(answer_id)
    assert len(answers) == before + 1 and answers[-1]["error"]["code"] == code


def test_a_body_that_is_not_utf8_gets_a_parse_error_with_its_id(server):
    server.write(frame(b'{"jsonrpc": "2.0", "id": "latin1", "method": "diffusion/stats", '
                       b'"params": {"x": "caf\xe9"}}'))
    assert server.response("latin1")["error"]["code"] == PARSE_ERROR


def test_stats_without_params(server):
    server.send({"jsonrpc": "2.0", "id": "bare-stats", "method": "diffusion/stats"})
    assert server.response("bare-stats")["result"]["state"] == "ready"


def test_bad_params_log_one_line_and_unopened_documents_one_warning(server):
    mark = len(server.log().splitlines())
    server.send({"jsonrpc": "2.0", "id": "bad-params", "method": "textDocument/inlineCompletion",
                 "params": {"textDocument": {"uri": 5}, "position": "here"}})
    assert server.response("bad-params")["error"]["code"] == INVALID_PARAMS
    server.notify("textDocument/didChange", {"textDocument": {"uri": "file:///nope.py",
                                                              "version": 2},
                                             "contentChanges": [{"text": "x"}]})
    server.notify("textDocument/didClose", {"textDocument": {"uri": "file:///nope.py"}})
    server.request("diffusion/stats")
    lines = log_lines_since(server, mark)
    assert len([line for line in lines if "bad-params" in line]) == 1, lines
    assert len([line for line in lines if "nope.py" in line]) == 2, lines
    assert len(lines) == 3, lines
    assert "Traceback" not in server.log() and "past_key_values" not in server.log()


# -- framing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("claimed", [10**12, 10**9])
def test_an_absurd_content_length_is_refused_and_the_server_keeps_serving(server, claimed):
    errors_before = len(server.responses(None))
    server.write(b"Content-Length: %d\r\n\r\n{\"jsonrpc\": \"2.0\"}" % claimed)
    assert server.request("diffusion/stats", timeout=10)["result"]["state"] == "ready"
    [refused] = server.responses(None)[errors_before:]
    assert "limit" in refused["error"]["message"]
    assert server.alive()


def test_wrong_content_lengths_resynchronise(server):
    body = json.dumps({"jsonrpc": "2.0", "id": "long", "method": "diffusion/stats"}).encode()
    server.write(b"Content-Length: %d\r\n\r\n" % (len(body) + 7) + body)  # too long
    short = json.dumps({"jsonrpc": "2.0", "id": "short", "method": "diffusion/stats"}).encode()
    server.write(b"Content-Length: %d\r\n\r\n" % (len(short) - 9) + short)  # too short
    server.write(b"garbage between frames\r\n")
    assert server.request("diffusion/stats")["result"]["state"] == "ready"
    assert "result" in server.response("long")
    assert server.responses("short") == []  # its id was cut off: an id-null error instead


def test_a_frame_claiming_more_than_comes_is_answered_after_the_stall_timeout(server):
    body = json.dumps({"jsonrpc": "2.0", "id": "stalled", "method": "diffusion/stats"}).encode()
    began = time.monotonic()
    server.write(b"Content-Length: %d\r\n\r\n" % (len(body) + 10) + body)  # nothing after
    assert "result" in server.response("stalled", timeout=STALL_S + 10)
    assert time.monotonic() - began >= STALL_S - 0.5


# -- lifecycle (no model needed: these never send `initialized`) -------------------------------


def test_requests_after_shutdown_get_invalid_request_and_exit_is_0():
    with RawServer() as raw:
        raw.initialize(load=False)
        assert raw.request("shutdown")["result"] is None
        assert raw.request("diffusion/stats")["error"]["code"] == INVALID_REQUEST
        raw.notify("exit")
        assert raw.process.wait(10) == 0


def test_exit_without_shutdown_exits_1():
    with RawServer() as raw:
        raw.initialize(load=False)
        raw.notify("exit")
        assert raw.process.wait(10) == 1


# -- serve --tcp -------------------------------------------------------------------------------


class TcpClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.frames = iter(FrameReader(self.file))

    def send(self, message: dict) -> None:
        self.sock.sendall(encode(message))

    def request(self, msg_id: str, method: str, params=None) -> dict:
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        for message in self.frames:
            if message.get("id") == msg_id and "method" not in message:
                return message
        raise EOFError(f"closed before answering {msg_id}")

    def initialize(self) -> dict:
        return self.request("init", "initialize", {"processId": None, "rootUri": None,
                                                    "capabilities": {}})

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture()
def tcp_port(tmp_path):
    log = tmp_path / "tcp.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, *SERVE, "--tcp", "--port", "0"],
                                   stdin=subprocess.DEVNULL, stderr=handle,
                                   cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 60
        while (found := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())) is None:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield int(found[1])
        assert process.poll() is None  # still listening
    finally:
        process.kill()
        process.wait()


def test_tcp_one_client_closing_does_not_stop_the_listener(tcp_port):
    TcpClient(tcp_port).close()  # connects and leaves at once
    time.sleep(0.3)
    client = TcpClient(tcp_port)
    client.sock.sendall(b"Content-Length: 1000000000000\r\n\r\n")  # framing as over stdio
    assert "capabilities" in client.initialize()["result"]
    client.close()


def test_tcp_a_second_client_is_refused_and_never_sees_the_first_ones_answers(tcp_port):
    first = TcpClient(tcp_port)
    first.initialize()
    first.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": "untitled:secret.py", "languageId": "python", "version": 1, "text": "key = 1"}}})
    second = TcpClient(tcp_port)
    assert first.request("mine", "diffusion/document",
                         {"uri": "untitled:secret.py"})["result"]["text"] == "key = 1"
    seen = list(second.frames)  # until the server closes it
    assert [m["method"] for m in seen] == ["window/showMessage"]
    assert "another client" in seen[0]["params"]["message"]
    first.close()
    time.sleep(0.5)
    third = TcpClient(tcp_port)  # served after the first left, with fresh state
    third.initialize()
    assert third.request("fresh", "diffusion/document", {"uri": "untitled:secret.py"}
                         )["result"] is None
    third.close()
