"""Previews over the team service's wire: `stream: true` on /v1/fim/completions (server-sent
events, one per denoising step) read by the remote backend, against an HTTP stand-in served by
httpx's MockTransport (the real service streams in tests/test_service.py)."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest

from diffusion_contract import wire
from lsp_server.backends import BackendError, CompletionJob
from lsp_server.backends.remote import RemoteBackend
from lsp_server.settings import Settings

STATS = wire.DiffusionStats(steps=3, full_passes=1, finish_reason="end", model_ms=4.0,
                            replica="r0")


def events(*parts: bytes) -> bytes:
    return b"".join(parts)


def answer_stream() -> bytes:
    final = wire.completion_response("diffusion-lsp", "a + b", 5, 3, STATS)
    return events(wire.step_chunk("c1", "m", 1, 3, "a \u2591\u2591"),
                  b": a comment line, ignored\n\n",
                  wire.step_chunk("c1", "m", 2, 3, "a +\u2591"),
                  wire.final_chunk(final), wire.SSE_DONE)


def transport(stream_body: bytes, seen: list, status: int = 200) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == wire.HEALTH_PATH:
            return httpx.Response(200, content=msgspec.json.encode(
                wire.Health("ok", model="m", replicas=1)))
        if request.url.path == wire.MODELS_PATH:
            return httpx.Response(200, json={"object": "list", "data": []})
        seen.append(json.loads(request.content))
        if status != 200:
            return httpx.Response(status, content=wire.error_body("nope"))
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, content=stream_body,
                                  headers={"Content-Type": "text/event-stream"})
        body = msgspec.json.encode(wire.completion_response("m", "whole", 5, 1, STATS))
        return httpx.Response(200, content=body)
    return httpx.MockTransport(handle)


async def started(stream_body: bytes, seen: list, status: int = 200) -> RemoteBackend:
    backend = RemoteBackend(transport(stream_body, seen, status))
    settings = msgspec.convert({"backend": "remote", "remote": {"retries": 0}}, Settings)
    await backend.start(settings, lambda message: None)
    return backend


def job(on_step=None) -> CompletionJob:
    return CompletionJob(prefix="def f(a, b):\n    return ", suffix="\n", max_tokens=16,
                         single_line=True, on_step=on_step)


@pytest.mark.asyncio
async def test_streamed_steps_become_previews_and_the_last_event_the_answer():
    seen: list = []
    steps: list = []
    backend = await started(answer_stream(), seen)
    outcome = await backend.complete(job(lambda *step: steps.append(step)))
    assert seen[-1]["stream"] is True
    assert steps == [(1, 3, "a \u2591\u2591"), (2, 3, "a +\u2591")]
    assert outcome.text == "a + b" and outcome.steps == 3 and outcome.finish_reason == "end"
    assert outcome.extra["streamed"] is True
    await backend.close()


@pytest.mark.asyncio
async def test_without_previews_nothing_is_streamed():
    seen: list = []
    backend = await started(answer_stream(), seen)
    outcome = await backend.complete(job())
    assert "stream" not in seen[-1] and outcome.text == "whole"
    await backend.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("body, message", [
    (wire.step_chunk("c", "m", 1, 2, "x\u2591"), "without an answer"),
    (wire.sse(wire.error_body("replica died", "server_error")), "mid-stream: replica died"),
    (b"data: {not json\n\n", "unreadable stream event"),
])
async def test_broken_streams_fail_the_completion_with_a_reason(body, message):
    backend = await started(body, [])
    with pytest.raises(BackendError, match=message):
        await backend.complete(job(lambda *step: None))
    await backend.close()


@pytest.mark.asyncio
async def test_a_refused_stream_is_reported_like_a_refused_request():
    backend = await started(b"", [], status=400)
    with pytest.raises(BackendError, match="rejected the request"):
        await backend.complete(job(lambda *step: None))
    await backend.close()


def test_only_fim_streams():
    with pytest.raises(wire.WireError, match="stream"):
        wire.decode_completions(b'{"model": "m", "prompt": "p", "stream": true}')
    assert wire.decode_fim(b'{"model": "m", "prompt": "p", "stream": true, '
                           b'"diffusing": true}').stream
