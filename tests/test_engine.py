"""The engine: many callers, one worker, batched steps, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from diffusion_contract.options import InfillOptions
from model.decoding.sampler import infill, new_state
from model.engine import Cancelled, Engine, QueueFull, hole_bytes

HOLES = [
    ("def f(x):\n    return ", "\n"),
    ("import os\n", "\nprint(1)\n"),
    ("class A:\n    def __init__(self):\n        self.", "\n"),
    ("x = [", "]\n"),
    ("", "def g():\n    pass\n"),
    ("for i in range(10):\n    ", ""),
]
OPTIONS = InfillOptions(max_tokens=20, threshold=0.05)


@pytest.fixture()
def engine(tiny_model):
    engine = Engine(tiny_model)
    yield engine
    engine.close()


def test_batching_changes_no_result(tiny_model, engine):
    alone = [infill(tiny_model, p, s, OPTIONS) for p, s in HOLES]
    requests = [engine.submit(p, s, OPTIONS) for p, s in HOLES]
    together = [r.result(30) for r in requests]
    assert [(r.text, r.steps) for r in alone] == [(r.text, r.steps) for r in together]
    assert engine.batched_rows > engine.forward_passes  # steps really were shared


def test_requests_from_many_threads(engine):
    results: dict[int, str] = {}

    def worker(index: int) -> None:
        prefix, suffix = HOLES[index % len(HOLES)]
        results[index] = engine.submit(prefix, suffix, OPTIONS).result(30).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 12
    assert results[0] == results[6]  # same hole, same answer, whatever the batch


def test_cancel_leaves_at_the_next_step(engine):
    slow = InfillOptions(max_tokens=64, initial_tokens=64, threshold=1.0)  # 64 steps
    request = engine.submit("x = ", "\n", slow)
    while request.state.steps < 2:
        time.sleep(0.001)
    request.cancel()
    steps_at_cancel = request.state.steps
    with pytest.raises(Cancelled):
        request.result(5)
    assert request.state.steps <= steps_at_cancel + 1
    assert engine.submit("y = ", "\n", OPTIONS).result(10).steps >= 1  # still serving


async def test_asyncio_cancellation_cancels_the_request(engine):
    slow = InfillOptions(max_tokens=64, initial_tokens=64, threshold=1.0)
    task = asyncio.create_task(engine.infill("x = ", "\n", slow))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    result = await engine.infill("y = ", "\n", OPTIONS)
    assert result.steps >= 1
    assert set(result.timings) >= {"queue_ms", "forward_ms", "total_ms"}


def test_a_failing_request_does_not_stop_the_worker(tiny_model, engine, monkeypatch):
    import model.decoding.sampler as sampler_module  # where the engine's step looks the pass up

    real = sampler_module.forward_holes
    calls = {"n": 0}

    def flaky(model, states, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated out-of-memory")
        return real(model, states, **kwargs)

    monkeypatch.setattr(sampler_module, "forward_holes", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.submit("a", "b", OPTIONS).result(10)
    assert engine.submit("a", "b", OPTIONS).result(10).steps >= 1


def test_close_cancels_what_is_in_flight(tiny_model):
    engine = Engine(tiny_model)
    request = engine.submit("x = ", "\n", InfillOptions(max_tokens=64, threshold=1.0))
    engine.close()
    assert request.future.done()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("a", "b")


def test_start_loads_on_the_worker_thread_and_serves_the_same_results(tiny_model):
    loaded_on = []

    def load():
        loaded_on.append(threading.get_ident())
        return tiny_model

    engine = Engine.start(load).result(30)
    try:
        assert loaded_on == [engine._thread.ident]  # load, warm-up and steps: one thread
        together = [engine.submit(p, s, OPTIONS) for p, s in HOLES]
        alone = [infill(tiny_model, p, s, OPTIONS) for p, s in HOLES]
        assert [r.result(30).text for r in together] == [r.text for r in alone]
    finally:
        engine.close()


def test_start_hands_a_failed_load_to_the_caller():
    def load():
        raise FileNotFoundError("no weights here")

    with pytest.raises(FileNotFoundError, match="no weights here"):
        Engine.start(load).result(30)


def test_a_dying_worker_is_restarted_and_serves_the_requests_that_waited(
        tiny_model, monkeypatch):
    """An exception outside a denoising step (here: building a finished hole's result) kills
    the worker's loop: the request in flight is told so, the loop is restarted, and a request
    queued meanwhile is served, with the same text it gets from a healthy engine."""
    import model.engine as engine_module
    from model.engine import WorkerRestarted

    real, calls = engine_module.state_result, {"n": 0}

    def broken_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("bug while finishing a hole")
        return real(*args)

    monkeypatch.setattr(engine_module, "state_result", broken_once)
    engine = Engine(tiny_model, backoff_s=0.01)
    try:
        first = engine.submit("a = ", "\n", OPTIONS)
        with pytest.raises(WorkerRestarted, match="bug while finishing a hole"):
            first.result(30)
        second = engine.submit("b = ", "\n", OPTIONS)
        assert second.result(30).text == infill(tiny_model, "b = ", "\n", OPTIONS).text
        assert engine.restarts == 1 and engine.failure is None
        assert "bug while finishing a hole" in engine.last_death
        assert engine._thread.is_alive()
    finally:
        engine.close(timeout=5)
    assert not engine._thread.is_alive()


def test_a_worker_that_keeps_dying_stops_after_the_restarts_a_minute_and_no_caller_hangs(
        tiny_model, monkeypatch):
    """Restarts are bounded: past `restarts_per_minute` deaths in a minute the engine stops,
    every waiting and later caller gets EngineStopped at once, and the backoff grew each time."""
    import model.engine as engine_module
    from model.engine import EngineStopped, WorkerRestarted

    def always_broken(*args):
        raise RuntimeError("bug while finishing a hole")

    waits = []
    monkeypatch.setattr(engine_module, "state_result", always_broken)
    engine = Engine(tiny_model, restarts_per_minute=2, backoff_s=0.001)
    real_wait = engine._closing.wait
    monkeypatch.setattr(engine._closing, "wait", lambda s: waits.append(s) or real_wait(s))
    outcomes = []
    for text in ("a = ", "b = ", "c = "):
        try:
            engine.submit(text, "\n", OPTIONS).result(30)
        except (WorkerRestarted, EngineStopped) as error:
            outcomes.append(type(error))
    assert outcomes == [WorkerRestarted, WorkerRestarted, EngineStopped]
    assert engine.restarts == 2 and waits == [0.001, 0.002]  # backoff doubles
    engine._thread.join(5)
    assert not engine._thread.is_alive()
    with pytest.raises(EngineStopped, match="bug while finishing a hole"):
        engine.submit("d = ", "\n", OPTIONS)
    engine.close(timeout=1)


def test_close_during_a_restart_backoff_does_not_wait_for_it(tiny_model, monkeypatch):
    """A close() while the worker waits to restart ends the wait: the worker is gone after
    close() returns, although the backoff was an hour."""
    import model.engine as engine_module
    from model.engine import WorkerRestarted

    def broken(*args):
        raise RuntimeError("bug while finishing a hole")

    monkeypatch.setattr(engine_module, "state_result", broken)
    engine = Engine(tiny_model, backoff_s=3600)
    with pytest.raises(WorkerRestarted):
        engine.submit("a = ", "\n", OPTIONS).result(30)
    engine.close(timeout=30)
    assert not engine._thread.is_alive()


def test_out_of_memory_fails_the_step_frees_memory_and_serving_goes_on(
        tiny_model, engine, monkeypatch):
    import torch

    import model.decoding.sampler as sampler_module  # where the engine's step looks the pass up
    import model.engine as engine_module

    real = sampler_module.forward_holes
    freed = []
    calls = {"n": 0}

    def out_of_memory_once(model, states, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, states, **kwargs)

    monkeypatch.setattr(sampler_module, "forward_holes", out_of_memory_once)
    monkeypatch.setattr(engine_module, "free_memory", freed.append)
    with pytest.raises(torch.OutOfMemoryError):
        engine.submit("a", "b", OPTIONS).result(10)
    assert freed == [tiny_model.device] and engine.out_of_memory == 1
    assert engine.submit("a", "b", OPTIONS).result(10).steps >= 1


def test_on_step_sees_each_step_but_the_last_on_the_worker(engine):
    seen = []
    options = InfillOptions(max_tokens=8, initial_tokens=8, threshold=1.0)
    result = engine.submit("x = ", "\n", options,
                           on_step=lambda state: seen.append(
                               (state.steps, threading.current_thread().name))).result(30)
    assert [step for step, _ in seen] == list(range(1, result.steps))
    assert {name for _, name in seen} == {"diffusion-engine"}


def test_a_failing_on_step_costs_nothing(engine):
    def broken(state):
        raise RuntimeError("preview broke")

    result = engine.submit("x = ", "\n", OPTIONS, on_step=broken).result(30)
    assert result.finish_reason != "cancelled"


def test_task_runs_on_the_worker_and_can_be_cancelled(tiny_model, engine):
    from model.decoding.multi_hole import infill_holes

    pieces = ["def f(x):\n    ", "\n    ", "\n"]
    done = engine.call(lambda model, stop: infill_holes(model, pieces, OPTIONS, stop)).future
    assert done.result(30).texts == infill_holes(tiny_model, pieces, OPTIONS).texts

    async def cancel_soon():
        slow = InfillOptions(max_tokens=64, threshold=1.0)
        task = asyncio.ensure_future(engine.run(
            lambda model, stop: infill_holes(model, pieces, slow, stop)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    assert engine.submit("x = ", "\n", OPTIONS).result(30).text is not None  # still serving


def test_a_completion_is_denoised_before_a_background_hole_that_came_first(engine):
    """Next edits run in the background: a completion submitted after one is stepped alone
    until it is done (the background hole waits, its state kept), then the other goes on."""
    gate = threading.Event()
    engine.call(lambda model, should_stop: gate.wait(30))  # holds the worker while both queue
    slow = InfillOptions(max_tokens=16, initial_tokens=16, threshold=1.0)  # one token a step
    background = engine.submit("x = ", "\n", slow, background=True)
    completion = engine.submit("def f(x):\n    return ", "\n", slow)
    steps_of_background_when_completed: list[int] = []
    completion.future.add_done_callback(
        lambda _: steps_of_background_when_completed.append(background.state.steps))
    gate.set()
    completion.result(30)
    assert background.result(30).steps > 0  # it went on afterwards, from where it was
    assert steps_of_background_when_completed == [0]


def _blocked(engine) -> threading.Event:
    """Hold the worker inside a task until the returned event is set."""
    release, inside = threading.Event(), threading.Event()

    def hold(model, should_stop):
        inside.set()
        release.wait(30)

    engine.call(hold)
    assert inside.wait(30)
    return release


def test_past_the_queue_bound_a_request_is_refused_at_once_and_the_queued_are_served(
        tiny_model):
    engine = Engine(tiny_model, max_queued=2)
    try:
        release = _blocked(engine)
        queued = [engine.submit(p, s, OPTIONS) for p, s in HOLES[:2]]
        with pytest.raises(QueueFull) as refused:
            engine.submit(*HOLES[2], OPTIONS)
        assert refused.value.retry_after_s >= 1 and engine.rejected == 1
        release.set()
        assert [r.result(30).text for r in queued] == [
            infill(tiny_model, p, s, OPTIONS).text for p, s in HOLES[:2]]
        assert engine.submit(*HOLES[2], OPTIONS).result(30).text  # room again
    finally:
        engine.close()


def test_cancelled_requests_do_not_hold_places_in_the_queue(tiny_model):
    """A burst of superseded (cancelled) requests leaves room for the newest one."""
    engine = Engine(tiny_model, max_queued=2)
    try:
        release = _blocked(engine)
        for prefix, suffix in HOLES[:2]:
            engine.submit(prefix, suffix, OPTIONS).cancel()
        newest = engine.submit(*HOLES[2], OPTIONS)  # refused while the cancelled counted
        assert engine.waiting == 1
        release.set()
        assert newest.result(30).text == infill(tiny_model, *HOLES[2], OPTIONS).text
    finally:
        engine.close()


@pytest.mark.parametrize("holes_that_fit", [1, 3])
def test_the_batch_is_bounded_by_memory_and_what_does_not_fit_waits(tiny_model,
                                                                     holes_that_fit):
    states = [new_state(tiny_model, p, s, OPTIONS) for p, s in HOLES]
    budget = holes_that_fit * max(hole_bytes(tiny_model, state) for state in states)
    engine = Engine(tiny_model, max_batch_bytes=budget)
    sizes: list[int] = []
    stepping = engine.stepping
    engine.stepping = lambda active: sizes.append(len(active)) or stepping(active)
    try:
        release = _blocked(engine)
        requests = [engine.submit(p, s, OPTIONS) for p, s in HOLES]
        release.set()
        together = [r.result(30).text for r in requests]
    finally:
        engine.close()
    assert together == [infill(tiny_model, p, s, OPTIONS).text for p, s in HOLES]
    assert max(sizes) == holes_that_fit
