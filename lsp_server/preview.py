"""Live denoising previews: `diffusion/preview` notifications while a hole denoises.

A backend reports each step from its own thread (the engine's worker, an HTTP stream); a
`PreviewSink` carries the reports onto the event loop and sends them as notifications, at most
one per step, and none once its request is answered, cancelled or superseded (it is closed
then, and a report already on its way is dropped on arrival). The last one says `done: true`
and carries the text the completion returns. The wire format is in docs/editor-features.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

PREVIEW = "diffusion/preview"


def preview_params(uri: str, version: int | None, line: int, character: int, step: int,
                   steps: int, text: str, done: bool) -> dict[str, Any]:
    """The notification's params (camelCase on the wire, as LSP's own)."""
    return {"textDocument": {"uri": uri, "version": version},
            "position": {"line": line, "character": character},
            "step": step, "steps": max(steps, step), "text": text, "done": done}


class PreviewSink:
    """Previews of one request. `report` may be called from any thread; `finish` and `close`
    on the event loop, by the request's own task."""

    def __init__(self, send: Callable[[dict[str, Any]], None], loop: asyncio.AbstractEventLoop,
                 task: asyncio.Task | None, uri: str, version: int | None, line: int,
                 character: int) -> None:
        self._send, self._loop, self._task = send, loop, task
        self._where = (uri, version, line, character)
        self.closed = False
        self.last_step = 0
        self.sent = 0

    def _live(self) -> bool:
        task = self._task
        return not self.closed and not (task is not None and (task.done() or task.cancelling()))

    def report(self, step: int, steps: int, text: str) -> None:
        """A step's picture, from any thread."""
        if self.closed:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, step, steps, text)
        except RuntimeError:  # the loop is closed: the server is going away
            self.closed = True

    def _deliver(self, step: int, steps: int, text: str) -> None:
        if not self._live() or step <= self.last_step:
            return
        self.last_step = step
        self.sent += 1
        self._send(preview_params(*self._where, step, steps, text, False))

    def finish(self, step: int, text: str) -> None:
        """The last preview: `done`, with the completion's text; then the sink is closed."""
        if self._live():
            last = max(step, self.last_step + 1)  # its own step: the one that finished
            self._send(preview_params(*self._where, last, last, text, True))
            self.sent += 1
        self.closed = True

    def close(self) -> None:
        """No more previews (the request was cancelled, superseded or failed)."""
        self.closed = True
