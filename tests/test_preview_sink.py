"""`lsp_server.preview.PreviewSink`: at most one preview a step, none once closed or cancelled,
the last one `done` with the completion's text."""

from __future__ import annotations

import asyncio
import threading

from lsp_server.preview import PreviewSink, preview_params


async def run_sink(actions) -> list[dict]:
    sent: list[dict] = []
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    sink = PreviewSink(sent.append, loop, task, "file:///a.py", 4, 1, 11)
    await actions(sink)
    return sent


async def test_reports_from_another_thread_arrive_once_a_step_in_order():
    async def actions(sink):
        def worker():
            for step in (1, 2, 2, 1, 3):  # a repeated or late step is dropped
                sink.report(step, 5, f"text{step}")
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        await asyncio.sleep(0.01)
        sink.finish(4, "final")
        sink.report(5, 5, "after the answer")
        await asyncio.sleep(0.01)

    sent = await run_sink(actions)
    assert [(p["step"], p["done"]) for p in sent] == [(1, False), (2, False), (3, False),
                                                      (4, True)]
    assert sent[-1]["text"] == "final" and sent[-1]["steps"] == 4
    assert sent[0] == preview_params("file:///a.py", 4, 1, 11, 1, 5, "text1", False)


async def test_nothing_after_close_not_even_reports_already_queued():
    async def actions(sink):
        sink.report(1, 3, "queued before the close")
        sink.close()
        await asyncio.sleep(0.01)
        sink.finish(2, "never sent")

    assert await run_sink(actions) == []


async def test_nothing_once_the_request_task_is_cancelled():
    sent: list[dict] = []
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def request():
        started.set()
        await asyncio.sleep(10)

    task = asyncio.ensure_future(request())
    await started.wait()
    sink = PreviewSink(sent.append, loop, task, "file:///a.py", 1, 0, 0)
    sink.report(1, 3, "in flight when the cancel came")
    task.cancel()  # $/cancelRequest: the preview queued before it must not go out
    await asyncio.sleep(0.01)
    assert sent == []


async def test_done_counts_its_own_step_when_the_backend_gives_none():
    async def actions(sink):
        sink.report(1, 2, "x")
        await asyncio.sleep(0.01)
        sink.finish(0, "xy")  # a remote that does not say how many steps it took

    sent = await run_sink(actions)
    assert [p["step"] for p in sent] == [1, 2] and sent[-1]["done"]
