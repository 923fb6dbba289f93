"""A stand-in for Inception's next-edit endpoint (`POST /v1/edit/completions`), on loopback:
it checks the contract and answers a scripted rewrite of the editable region. Used by the
next-edit tests of the server, Neovim and VS Code."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec

from diffusion_contract import edit_wire
from tests.remote_standin import Seen, StandIn

# the document the next-edit tests rename a parameter in
SOURCE = ("def area(width, height):\n"
          "    \"\"\"The area of a width by height rectangle.\"\"\"\n"
          "    return width * height\n"
          "\n"
          "\n"
          "print(area(2, 3))\n")

EDIT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "presence_penalty", "stop", "stream"}


@dataclass
class EditStandIn(StandIn):
    """StandIn (tests/remote_standin.py) that also answers Inception's edit endpoint with
    `rewrite(prompt) -> region | None` (None: the answer `None`, no edit)."""

    rewrite: Callable[[edit_wire.EditPrompt], str | None] = lambda prompt: prompt.region
    hang_edits: int = 0  # the next this many edit requests get no answer until cancelled

    def edits(self) -> list[Seen]:
        return [s for s in self.seen if s.path == edit_wire.EDIT_PATH]

    def _answer(self, seen: Seen) -> tuple:
        if seen.path != edit_wire.EDIT_PATH:
            return super()._answer(seen)
        self.seen.append(seen)
        if seen.headers.get("authorization") != f"Bearer {self.key}":
            return 401, {"error": {"message": "Incorrect API key provided"}}, {}
        if self.hang_edits > 0:
            self.hang_edits -= 1
            return "hang", None, {}
        body = seen.body
        problem = None
        if not isinstance(body, dict) or set(body) - EDIT_FIELDS:
            problem = f"unknown fields: {sorted(set(body or {}) - EDIT_FIELDS)}"
        elif body.get("stream") or len(body.get("messages", [])) != 1:
            problem = "exactly one user message, no streaming"
        if problem is None:
            try:
                _, prompt = edit_wire.decode_edit(msgspec.json.encode(body))
            except edit_wire.WireError as error:
                problem = str(error)
        if problem is not None:
            return 400, {"error": {"message": problem, "type": "invalid_request_error"}}, {}
        region = self.rewrite(prompt)
        content = "None" if region is None else f"```\n{region}\n```"
        return 200, {"id": "edit-standin", "object": "chat.completion", "created": 1,
                     "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": 50, "completion_tokens": 20,
                               "total_tokens": 70}}, {}


def rename_uses(prompt: edit_wire.EditPrompt) -> str:
    return prompt.region.replace("width *", "w *").replace("a width by", "a w by")


GUARD = ("    if w < 0 or height < 0:\n"
         "        raise ValueError(\"a side is negative\")\n")


def rename_and_guard(prompt: edit_wire.EditPrompt) -> str:
    """rename_uses, the docstring first; once it reads `a w by`, the `return` too with a guard
    of two lines before it: a next edit of several lines (once)."""
    region = prompt.region
    if "a width by" in region:
        return region.replace("a width by", "a w by")
    if GUARD in region:
        return region
    return rename_uses(prompt).replace("    return w *", GUARD + "    return w *")


@contextlib.contextmanager
def standin_in_a_thread(rewrite: Callable[[edit_wire.EditPrompt], str | None] = rename_uses
                        ) -> Iterator[EditStandIn]:
    loop = asyncio.new_event_loop()
    standin = EditStandIn(rewrite=rewrite)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(standin.__aenter__())
        ready.set()
        loop.run_forever()
        loop.close()

    async def stop() -> None:
        await standin.__aexit__(None, None, None)
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        # connections still open end when their client (the server, gone now) hung up
        await asyncio.wait(others, timeout=2) if others else None

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield standin
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
