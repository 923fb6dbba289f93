"""The real server process driven with raw JSON-RPC bytes (tests and the fuzz suite).

pygls' client (`benchmarks/lsp_client.py`) refuses to send what a hostile or broken client
would send (bad versions, object ids, invalid UTF-8, wrong Content-Length); this one writes
bytes as given and reads every frame the server sends back, on a thread of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

SERVE = ("-m", "diffusion_lsp", "serve")
TIMEOUT_S = 10.0


def frame(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def encode(message: dict) -> bytes:
    return frame(json.dumps(message).encode())


def key(msg_id) -> str:
    """A dictionary key for any JSON id (a hostile one may be an object)."""
    return json.dumps(msg_id, sort_keys=True)


class FrameReader:
    """Splits the server's stdout into JSON messages (the server is trusted to frame right)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __iter__(self):
        while True:
            length = None
            while True:
                line = self.stream.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("ascii").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if length is None:
                raise ValueError("a frame without Content-Length from the server")
            yield json.loads(self.stream.read(length))


class RawServer:
    """`diffusion-lsp serve` in a subprocess; messages in as bytes, messages out as dicts."""

    def __init__(self, extra_args: Sequence[str] = (), log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.log_file = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        root = str(Path(__file__).resolve().parent.parent)
        environment = {**os.environ, "PYTHONPATH": root, **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, *SERVE, *extra_args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log_file, env=environment, cwd=root)
        self.messages: list[dict] = []
        self.answers: dict[str, list[dict]] = {}  # responses by id
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.next_id = 0

    def _read(self) -> None:
        for message in FrameReader(self.process.stdout):
            with self.changed:
                self.messages.append(message)
                if "method" not in message:
                    self.answers.setdefault(key(message.get("id")), []).append(message)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    # -- sending ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, message: dict) -> None:
        self.write(encode(message))

    def notify(self, method: str, params=None) -> None:
        message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)

    def new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    def request(self, method: str, params=None, timeout: float = TIMEOUT_S) -> dict:
        """Send a request and return its response (result or error), waiting for it."""
        msg_id = self.new_id()
        message = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return self.response(msg_id, timeout)

    # -- receiving ----------------------------------------------------------------------------

    def forget(self) -> None:
        """Drop what came so far (a long fuzz run would otherwise hold every message)."""
        with self.changed:
            self.messages.clear()
            self.answers.clear()

    def responses(self, msg_id) -> list[dict]:
        with self.changed:
            return list(self.answers.get(key(msg_id), []))

    def response(self, msg_id, timeout: float = TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                if found := self.answers.get(key(msg_id)):
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    raise TimeoutError(f"no response to {msg_id!r} in {timeout} s")
                self.changed.wait(left)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.request("diffusion/stats", {}, timeout)["result"]
            if result["state"] in ("ready", "error", "disabled"):
                return result
            time.sleep(0.1)
        raise TimeoutError("the model did not load")

    def initialize(self, options: dict | None = None, encoding: str | None = None,
                   load: bool = True) -> dict:
        """initialize, then (with `load`) initialized, which makes the server load its model."""
        capabilities: dict = {}
        if encoding:
            capabilities["general"] = {"positionEncodings": [encoding]}
        answer = self.request("initialize", {"processId": None, "rootUri": None,
                                             "capabilities": capabilities,
                                             "initializationOptions": options or {}})
        if load:
            self.notify("initialized", {})
        return answer["result"]

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def close(self, timeout: float = 10.0) -> int:
        """Shut down politely if it still runs; returns the exit code."""
        if self.alive():
            try:
                self.request("shutdown", timeout=timeout)
                self.notify("exit")
                self.process.stdin.close()
                return self.process.wait(timeout)
            except (OSError, TimeoutError, subprocess.TimeoutExpired):
                self.process.kill()
        code = self.process.wait()
        if self.log_file is not subprocess.DEVNULL:
            self.log_file.close()
        return code

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        if self.log_file is not subprocess.DEVNULL:
            self.log_file.close()
