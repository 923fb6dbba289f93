"""Fuzzing the real server over stdio: random sequences of valid and broken messages.

A case is a list of steps (opens, incremental edits over random Unicode with every
line-separator lookalike, completions, cancels, closes, garbage frames) sent as raw JSON-RPC
to one `diffusion-lsp serve` process on a tiny random model. After every step:

- the server's copy of every document (`diffusion/document`) equals `Reference`, a model of
  the document built from the LSP spec alone (lines end at \\n, \\r\\n, \\r; positions in UTF-16
  code units, clamped to the line and the document);
- every request whose id the server could read got exactly one response (a frame cut short
  takes its id with it: that one gets none);
- the process is alive.

`tests/test_fuzz_lsp.py` runs a fast profile in CI; `python -m tests.fuzz_lsp --minutes 10`
runs a long one and prints the cases tried per minute.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.raw_lsp import RawServer, encode, frame

LOOKALIKES = ["\u2028", "\u2029", "\x85", "\f", "\v", "\x1c", "\x1d", "\x1e"]
LINE_ENDS = ["\n", "\r\n", "\r"]
PIECES = [*LOOKALIKES, *LINE_ENDS, "def f(x):", "    return ", "x = 1", "a", " ", "\t", "😋",
          "é", "中", "\ud800", "(", ")", '"', "\\"]
DOCUMENTS = 3  # documents a case may touch
CANCELLED = -32800
RESPONSE_TIMEOUT_S = 60.0
OPTIONS = {"completion": {"debounceMs": 0, "maxTokens": 8, "maxTokensSingleLine": 8,
                          "tokensPerStep": 4}}

# -- the spec's document --------------------------------------------------------------------


def utf16_units(char: str) -> int:
    return 2 if ord(char) > 0xFFFF else 1


@dataclass
class Reference:
    """A text document as the LSP spec defines it, kept independently of the server's code."""

    text: str

    def line_starts(self) -> list[tuple[int, int]]:
        """(start, end without line end) of every line, scanning character by character."""
        spans, start, index, text = [], 0, 0, self.text
        while index < len(text):
            char = text[index]
            if char == "\r" and index + 1 < len(text) and text[index + 1] == "\n":
                spans.append((start, index))
                index += 2
                start = index
                continue
            if char in "\r\n":
                spans.append((start, index))
                start = index + 1
            index += 1
        spans.append((start, len(text)))
        return spans

    def offset(self, line: int, character: int) -> int:
        spans = self.line_starts()
        if line >= len(spans):
            return len(self.text)
        start, end = spans[line]
        units = 0
        for index in range(start, end):
            size = utf16_units(self.text[index])
            if units + size > character:
                return index
            units += size
        return end

    def edit(self, start: tuple[int, int], end: tuple[int, int], new_text: str) -> None:
        first, last = sorted((self.offset(*start), self.offset(*end)))
        self.text = self.text[:first] + new_text + self.text[last:]


# -- steps ----------------------------------------------------------------------------------

texts = st.lists(st.one_of(st.sampled_from(PIECES), st.characters()), max_size=24).map("".join)
positions = st.tuples(st.integers(0, 7), st.integers(0, 14))
GARBAGE = ("bytes", "not-utf8", "bad-version", "object-id", "huge-length", "long-length",
           "short-length", "no-header", "batch", "not-an-object")

steps = st.one_of(
    st.tuples(st.just("open"), st.integers(0, DOCUMENTS - 1), texts),
    st.tuples(st.just("edit"), st.integers(0, DOCUMENTS - 1), positions, positions, texts),
    st.tuples(st.just("edit"), st.integers(0, DOCUMENTS - 1), positions, positions, texts),
    st.tuples(st.just("complete"), st.integers(0, DOCUMENTS - 1), positions, st.booleans()),
    st.tuples(st.just("close"), st.integers(0, DOCUMENTS - 1)),
    st.tuples(st.just("garbage"), st.sampled_from(GARBAGE), st.binary(max_size=64),
              st.integers(1, 40)),
)
cases = st.lists(steps, min_size=1, max_size=12)


@dataclass
class Run:
    """One server process and what the fuzz expects of it."""

    server: RawServer
    expected: dict = field(default_factory=dict)  # request id -> responses it must get (a case)
    cases: int = 0
    steps: int = 0
    ids: itertools.count = field(default_factory=itertools.count)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self.ids)}"

    def request(self, method: str, params, answered: int = 1) -> str:
        msg_id = self.new_id("f")
        self.expected[msg_id] = answered
        self.server.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return msg_id


def garbage(run: Run, kind: str, noise: bytes, by: int) -> None:
    """Send one broken frame; record how many responses its id (if any) must get."""
    msg_id = run.new_id("g")
    request = {"jsonrpc": "2.0", "id": msg_id, "method": "diffusion/stats", "params": {}}
    body = json.dumps(request).encode()
    write = run.server.write
    if kind == "bytes":
        write(frame(noise))
    elif kind == "not-utf8":  # the id is still readable through the bad byte
        run.expected[msg_id] = 1
        write(frame(body.replace(b'"params": {}', b'"params": {"x": "\xff\xfe"}')))
    elif kind == "bad-version":
        run.expected[msg_id] = 1
        run.server.send({**request, "jsonrpc": "1.0"})
    elif kind == "object-id":
        run.server.send({**request, "id": {"id": msg_id}})
    elif kind == "huge-length":
        write(b"Content-Length: %d\r\n\r\n" % (10**12 + by))
    elif kind == "long-length":  # the message is read, the rest given back
        run.expected[msg_id] = 1
        write(b"Content-Length: %d\r\n\r\n" % (len(body) + by) + body)
    elif kind == "short-length":  # its id is cut off: no response can carry it
        run.expected[msg_id] = 0
        write(b"Content-Length: %d\r\n\r\n" % max(1, len(body) - by) + body)
    elif kind == "no-header":
        run.expected[msg_id] = 0
        write(body + b"\r\n")
    elif kind == "batch":
        run.expected[msg_id] = 0
        write(encode([request]))  # type: ignore[arg-type]
    elif kind == "not-an-object":
        write(frame(json.dumps([1, "two", None]).encode()))


def wait_for_responses(run: Run) -> None:
    deadline = time.monotonic() + RESPONSE_TIMEOUT_S
    for msg_id, count in run.expected.items():
        if count == 0:
            continue
        left = max(0.1, deadline - time.monotonic())
        run.server.response(msg_id, left)


def check(run: Run, references: dict[str, Reference | None]) -> None:
    """After a step: the documents agree, every id got its one response, the process lives."""
    assert run.server.alive(), "the server died"
    run.request("diffusion/stats", None)  # a message after the step (ends a stalled frame)
    asked = {uri: run.request("diffusion/document", {"uri": uri}) for uri in references}
    wait_for_responses(run)
    for uri, reference in references.items():
        [answer] = run.server.responses(asked[uri])
        got = answer["result"]
        if reference is None:
            assert got is None, f"{uri} is closed, the server has {got!r}"
        else:
            assert got is not None, f"{uri} is open, the server does not have it"
            assert got["text"] == reference.text, (uri, got["text"], reference.text)
    for msg_id, count in run.expected.items():
        answers = run.server.responses(msg_id)
        assert len(answers) == count, (msg_id, count, answers)
        for answer in answers:
            if msg_id.startswith("f") and "error" in answer:
                assert answer["error"]["code"] == CANCELLED, answer


def run_case(run: Run, case: list[tuple]) -> None:
    run.cases += 1
    run.expected = {}  # this case's ids (a late duplicate answer still shows within the case)
    run.server.forget()
    uris = [f"untitled:fuzz-{run.cases}-{index}.py" for index in range(DOCUMENTS)]
    references: dict[str, Reference | None] = {}
    versions = dict.fromkeys(uris, 0)
    for step in case:
        run.steps += 1
        kind = step[0]
        if kind == "open":
            uri = uris[step[1]]
            if references.get(uri) is not None:  # reopening an open document is a client bug
                continue
            versions[uri] += 1
            references[uri] = Reference(step[2])
            run.server.notify("textDocument/didOpen", {"textDocument": {
                "uri": uri, "languageId": "python", "version": versions[uri], "text": step[2]}})
        elif kind == "edit":
            uri, start, end, text = uris[step[1]], step[2], step[3], step[4]
            versions[uri] += 1
            reference = references.get(uri)
            if reference is not None:
                reference.edit(start, end, text)
            run.server.notify("textDocument/didChange", {
                "textDocument": {"uri": uri, "version": versions[uri]},
                "contentChanges": [{"range": {
                    "start": {"line": start[0], "character": start[1]},
                    "end": {"line": end[0], "character": end[1]}}, "text": text}]})
        elif kind == "complete":
            uri, (line, character), cancel = uris[step[1]], step[2], step[3]
            msg_id = run.request("textDocument/inlineCompletion", {
                "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
                "context": {"triggerKind": 2}})
            if cancel:
                run.server.notify("$/cancelRequest", {"id": msg_id})
        elif kind == "close":
            uri = uris[step[1]]
            if uri in references:
                references[uri] = None
            run.server.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
        else:
            garbage(run, *step[1:])
        check(run, references)
    for uri, reference in references.items():  # the next case starts with nothing open
        if reference is not None:
            run.server.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


def start(log: Path, tiny_dir: Path) -> Run:
    server = RawServer(log_path=log)
    server.initialize({**OPTIONS, "model": {"path": str(tiny_dir)}})
    assert server.wait_ready()["state"] == "ready"
    return Run(server)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=50, help="cases per hypothesis run")
    args = parser.parse_args(argv)
    from model.network.tiny import write_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="fuzz-lsp-"))
    run = start(folder / "server.log", write_tiny_model(folder / "tiny"))
    print(f"fuzzing for {args.minutes:g} min; server log {folder / 'server.log'}", flush=True)
    began = last = time.monotonic()
    last_cases = 0
    try:
        while time.monotonic() - began < args.minutes * 60:

            @seed(random.getrandbits(64))
            @fuzz_settings(args.batch)
            @given(cases)
            def batch(case: list[tuple]) -> None:
                run_case(run, case)

            batch()
            now = time.monotonic()
            if now - last >= 60 or now - began >= args.minutes * 60:
                rate = (run.cases - last_cases) / ((now - last) / 60)
                print(f"{(now - began) / 60:5.1f} min: {run.cases} cases, {run.steps} steps, "
                      f"{rate:.0f} cases/min", flush=True)
                last, last_cases = now, run.cases
    finally:
        run.server.close()
    minutes = (time.monotonic() - began) / 60
    print(f"done: {run.cases} cases ({run.steps} steps) in {minutes:.1f} min, "
          f"{run.cases / minutes:.0f} cases/min, {run.steps / minutes:.0f} steps/min, "
          "no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
