"""The remote backend against a STAND-IN for Inception's Mercury FIM API (tests/remote_standin.py).

The stand-in is a small HTTP/1.1 server on loopback that follows the request and response shapes
Inception documents for `POST /v1/fim/completions` (and OpenAI's `/v1/completions` with
`suffix`): a bearer key, `model`/`prompt`/`suffix`/`max_tokens`/`stop`/`temperature` in, an
OpenAI text completion out. It is not Mercury: no real key is ever used or stored here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace

import httpx
import msgspec
import pytest

from diffusion_contract import wire
from lsp_server.backends import BackendError, CompletionJob, make_backend
from lsp_server.backends.remote import Endpoints, RemoteBackend, backoff_s, cut_at_stop
from lsp_server.settings import RemoteSettings, SamplerSettings, Settings
from tests.remote_standin import KEY, KEY_ENV, StandIn


def _settings(url: str, **remote) -> Settings:
    remote.setdefault("api_key_env", KEY_ENV)
    return Settings(backend="remote", remote=RemoteSettings(url=url, **remote))


JOB = CompletionJob(prefix="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))\n",
                    max_tokens=24, single_line=True, stop=("#",))


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


async def _started(url: str, **remote) -> RemoteBackend:
    backend = RemoteBackend()
    await backend.start(_settings(url, **remote), lambda message: None)
    return backend


# -- the request and the answer ------------------------------------------------------------------


async def test_fim_request_follows_the_documented_shape_and_the_answer_is_read():
    async with StandIn() as standin:
        backend = await _started(standin.url, model="mercury-coder")
        outcome = await backend.complete(JOB)
        await backend.close()
    (seen,) = standin.completions()
    assert seen.method == "POST" and seen.path == "/v1/fim/completions"
    assert seen.body == {"model": "mercury-coder", "prompt": JOB.prefix, "suffix": JOB.suffix,
                         "max_tokens": 24, "stop": ["#", "\n"], "temperature": 0.0}
    assert outcome.text == "a + b"
    assert outcome.tokens == 3 and outcome.finish_reason == "max_tokens"


async def test_openai_completions_api_with_suffix():
    async with StandIn() as standin:
        backend = await _started(standin.url, api="completions")
        outcome = await backend.complete(JOB)
        await backend.close()
    (seen,) = standin.completions()
    assert seen.path == "/v1/completions"
    assert seen.body["prompt"] == JOB.prefix and seen.body["suffix"] == JOB.suffix
    assert outcome.text == "a + b"


async def test_chat_shaped_fim_answer_is_read_too():
    async with StandIn(plan=["chat"]) as standin:
        backend = await _started(standin.url)
        outcome = await backend.complete(JOB)
        await backend.close()
    assert outcome.text == "a + b"


async def test_stop_words_apply_even_when_the_server_ignores_them():
    async with StandIn(text="a + b  # sum\nprint()") as standin:
        backend = await _started(standin.url)
        outcome = await backend.complete(JOB)
        await backend.close()
    assert outcome.text == "a + b  " and outcome.finish_reason == "stop"


async def test_start_describes_a_server_that_is_not_ours_and_sends_no_extensions():
    reports: list[str] = []
    async with StandIn() as standin:
        backend = RemoteBackend()
        description = await backend.start(_settings(standin.url), reports.append)
        await backend.complete(JOB)
        await backend.close()
    assert standin.url in description
    assert [s.path for s in standin.seen][:2] == ["/health", "/v1/models"]
    body = standin.completions()[0].body
    assert "threshold" not in body and "algorithm" not in body and "seed" not in body


async def test_our_service_gets_the_sampler_settings_the_server_was_given():
    sampler = SamplerSettings(algorithm="entropy", steps=8, temperature=0.2, top_p=0.95, seed=5)
    async with StandIn(ours=True) as standin:
        backend = await _started(standin.url)
        await backend.complete(replace(JOB, sampler=sampler))
        await backend.close()
    (seen,) = standin.completions()
    hole = wire.decode_fim(json.dumps(seen.body).encode())
    # no threshold set: none sent, the service runs its model card's (`Family.threshold`)
    assert hole.sampler == {"algorithm": "entropy", "steps": 8, "top_p": 0.95,
                            "top_k": 0, "alg_temp": 0.0, "cfg_scale": 0.0, "exact": False,
                            "seed": 5}
    assert hole.temperature == 0.2
    async with StandIn(ours=True) as standin:
        backend = await _started(standin.url)
        await backend.complete(replace(JOB, sampler=sampler, threshold=0.8))
        await backend.close()
    (seen,) = standin.completions()
    assert wire.decode_fim(json.dumps(seen.body).encode()).sampler["threshold"] == 0.8


def test_wire_checks_the_sampler_settings():
    for fields, problem in ((b'"algorithm": "greedy"', "maskgit_plus"),
                            (b'"threshold": 1.5', r"threshold must lie in \[0, 1\]"),
                            (b'"tokens_per_step": 0', "tokens_per_step must be at least 1"),
                            (b'"steps": 8, "block_length": 5', "multiple of block_length"),
                            (b'"algorithm": "origin"', "needs steps"),
                            (b'"top_p": 0', "top_p")):
        with pytest.raises(wire.WireError, match=problem):
            wire.decode_fim(b'{"model": "m", "prompt": "p", "max_tokens": 16, ' + fields + b"}")


def test_the_sampler_settings_are_the_samplers_everywhere():
    """The language server's settings, the wire's extensions and the `infill` flags are the
    InfillOptions fields diffusion_contract/options.py marks, with the sampler's defaults and
    names."""
    from diffusion_contract.options import (
        ALGORITHMS,
        COMMIT_SETTINGS,
        SAMPLER_SETTINGS,
        InfillOptions,
    )
    from diffusion_lsp.cli import build_parser
    from lsp_server.settings import CompletionSettings, SamplerSettings

    defaults = InfillOptions()
    for setting in (*COMMIT_SETTINGS, *SAMPLER_SETTINGS):
        assert getattr(defaults, setting.name) == setting.default
    assert [s.name for s in SAMPLER_SETTINGS] == list(SamplerSettings.__struct_fields__)
    assert msgspec.structs.asdict(SamplerSettings()) == {
        s.name: s.default for s in SAMPLER_SETTINGS}
    completion = CompletionSettings()
    # threshold unset: the model card's where its family names one, else the sampler's
    assert (completion.threshold, completion.tokens_per_step) == (None, None)
    wire_names = {s.name for s in wire.EXTENSIONS} | {"temperature"}
    assert wire_names == {s.name for s in (*COMMIT_SETTINGS, *SAMPLER_SETTINGS)}
    assert wire_names - {"temperature"} <= set(wire.FimRequest.__struct_fields__)
    infill = next(action for action in build_parser()._subparsers._group_actions[0]
                  .choices["infill"]._actions if action.dest == "algorithm")
    assert tuple(infill.choices) == tuple(ALGORITHMS)
    for refused in (msgspec.convert({"algorithm": "greedy"}, SamplerSettings),
                    wire.FimRequest(model="m", prompt="p", algorithm="greedy")):
        assert refused.algorithm == "greedy"  # decoded; InfillOptions refuses it, naming all


# -- failures, retries, deadline -----------------------------------------------------------------


async def test_429_then_200_is_retried():
    async with StandIn(plan=[429, "ok"]) as standin:
        backend = await _started(standin.url, retries=2)
        outcome = await backend.complete(JOB)
        await backend.close()
    assert outcome.text == "a + b"
    assert len(standin.completions()) == 2


async def test_500s_exhaust_the_retries():
    async with StandIn(plan=[500, 502, 503, 500]) as standin:
        backend = await _started(standin.url, retries=2)
        with pytest.raises(BackendError) as raised:
            await backend.complete(JOB)
        await backend.close()
    assert raised.value.kind == "failed" and "503" in str(raised.value)
    assert len(standin.completions()) == 3  # the first try and two retries


async def test_a_bad_request_is_not_retried():
    async with StandIn(plan=[400]) as standin:
        backend = await _started(standin.url, retries=3)
        with pytest.raises(BackendError) as raised:
            await backend.complete(JOB)
        await backend.close()
    assert raised.value.kind == "failed" and len(standin.completions()) == 1


async def test_no_answer_fails_at_the_deadline_without_retrying_past_it():
    async with StandIn(plan=["hang", "hang", "hang"]) as standin:
        backend = await _started(standin.url, timeout_ms=400, retries=2)
        with pytest.raises(BackendError) as raised:
            await asyncio.wait_for(backend.complete(JOB), 30)  # a guard against a hang
        await backend.close()
        assert standin.hung.is_set()  # it was waiting for the answer, not failing early
        assert len(standin.completions()) == 1  # one deadline for the completion, retries in
    assert raised.value.kind == "unavailable" and "400 ms" in str(raised.value)


async def test_service_down_is_unavailable_quickly_and_start_still_succeeds():
    async with StandIn() as standin:
        url = standin.url  # the port is closed once the stand-in is gone
    reports: list[str] = []
    backend = RemoteBackend()
    description = await backend.start(_settings(url, timeout_ms=3000), reports.append)
    assert "not reachable" in description and any("not reachable" in r for r in reports)
    with pytest.raises(BackendError) as raised:
        await asyncio.wait_for(backend.complete(JOB), 30)  # a guard against a hang
    # a refused connection is reported as such, not waited out to the 3 s deadline
    assert raised.value.kind == "unavailable" and "cannot reach" in str(raised.value)
    assert "3000 ms" not in str(raised.value)
    await backend.close()


async def test_cancelling_the_completion_closes_the_connection():
    async with StandIn(plan=["hang"]) as standin:
        backend = await _started(standin.url, timeout_ms=10_000)
        task = asyncio.create_task(backend.complete(JOB))
        await asyncio.wait_for(standin.hung.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(standin.dropped.wait(), 2)  # the stand-in saw the hang-up
        outcome = await backend.complete(JOB)  # and the backend still works
        await backend.close()
    assert outcome.text == "a + b"


# -- the key -------------------------------------------------------------------------------------


async def test_a_refused_key_is_unauthorized_at_start_and_per_completion():
    async with StandIn(key="another key") as standin:
        backend = RemoteBackend()
        with pytest.raises(BackendError) as at_start:
            await backend.start(_settings(standin.url), lambda message: None)
        assert at_start.value.kind == "unauthorized" and KEY_ENV in str(at_start.value)
        standin.key = KEY
        backend = await _started(standin.url)
        standin.key = "rotated"
        with pytest.raises(BackendError) as per_completion:
            await backend.complete(JOB)
        await backend.close()
    assert per_completion.value.kind == "unauthorized"
    assert len(standin.completions()) == 1  # a refused key is not retried


async def test_the_key_never_reaches_a_log_line_or_an_error(caplog):
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    errors: list[str] = []
    async with StandIn(plan=["ok", 500, 500, 500, "hang"]) as standin:
        backend = RemoteBackend()
        errors.append(await backend.start(_settings(standin.url, retries=2, timeout_ms=500),
                                          errors.append))
        await backend.complete(JOB)
        for _ in range(2):
            try:
                await backend.complete(JOB)
            except BackendError as error:
                errors.append(f"{error!r} {error}")
        errors.append(repr(backend))
        standin.key = "rotated"
        try:
            await backend.complete(JOB)
        except BackendError as error:
            errors.append(f"{error!r} {error}")
        await backend.close()
    assert standin.seen[0].headers["authorization"] == f"Bearer {KEY}"  # it was sent...
    assert len(caplog.records) > 5  # ...with logging on...
    assert KEY not in caplog.text  # ...and never logged
    assert not [e for e in errors if KEY in e]


async def test_the_key_comes_from_the_setting_before_the_environment():
    async with StandIn(key="from-setting") as standin:
        backend = await _started(standin.url, api_key="from-setting")
        assert (await backend.complete(JOB)).text == "a + b"
        await backend.close()


async def test_mercury_needs_a_key_and_is_not_asked_for_health(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    backend = RemoteBackend()
    with pytest.raises(BackendError) as raised:
        await backend.start(_settings("https://api.inceptionlabs.ai/v1"), lambda m: None)
    assert raised.value.kind == "unauthorized" and KEY_ENV in str(raised.value)

    monkeypatch.setenv(KEY_ENV, KEY)
    paths: list[str] = []

    def mercury(request: httpx.Request) -> httpx.Response:  # no network: a mock transport
        paths.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": []})
        body = json.loads(request.content)
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 1,
                                         "model": body["model"], "choices": [
                                             {"index": 0, "text": "x", "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                   "total_tokens": 2}})

    backend = RemoteBackend(transport=httpx.MockTransport(mercury))
    description = await backend.start(_settings("https://api.inceptionlabs.ai/v1"),
                                      lambda m: None)
    outcome = await backend.complete(JOB)
    await backend.close()
    assert paths == ["/v1/models", "/v1/fim/completions"]  # no /health, no /v1/v1
    assert "mercury-edit-2" in description and outcome.text == "x"


def test_make_backend_picks_the_remote_backend():
    assert isinstance(make_backend(Settings(backend="remote")), RemoteBackend)


# -- small pure pieces ---------------------------------------------------------------------------


def test_endpoints_parse():
    assert Endpoints.parse("https://api.inceptionlabs.ai/v1/").root == "https://api.inceptionlabs.ai"
    assert Endpoints.parse("https://api.inceptionlabs.ai/v1").mercury
    assert Endpoints.parse("http://127.0.0.1:8000").loopback
    assert not Endpoints.parse("http://gpu-box:8000").secure
    assert Endpoints.parse("http://h/prefix/v1").url(wire.FIM_PATH) == \
        "http://h/prefix/v1/fim/completions"
    with pytest.raises(BackendError):
        Endpoints.parse("gpu-box:8000")


def test_backoff_grows_and_honours_retry_after():
    assert backoff_s(0, "2") == 2.0
    first = [backoff_s(0) for _ in range(50)]
    third = [backoff_s(2) for _ in range(50)]
    assert max(first) <= 0.1 < min(third) * 2 and max(third) <= 0.4


def test_cut_at_stop():
    assert cut_at_stop("a\nb#c", ("#", "\n")) == ("a", True)
    assert cut_at_stop("abc", ("#",)) == ("abc", False)


def test_wire_rejects_streaming_and_bad_fields():
    with pytest.raises(wire.WireError, match="stream"):  # FIM streams; legacy completions not
        wire.decode_completions(b'{"model": "m", "prompt": "p", "stream": true}')
    with pytest.raises(wire.WireError, match="max_tokens"):
        wire.decode_fim(b'{"model": "m", "prompt": "p", "max_tokens": 0}')
    with pytest.raises(wire.WireError, match="bad request body"):
        wire.decode_fim(b'{"model": "m", "prompt": 3}')
    hole = wire.decode_completions(b'{"model": "m", "prompt": ["p"], "suffix": "s", '
                                   b'"stop": "\\n"}')
    assert hole.prefix == "p" and hole.suffix == "s" and hole.single_line


def test_wire_response_round_trip():
    stats = wire.DiffusionStats(steps=3, full_passes=1, finish_reason="max_tokens",
                                model_ms=1.5)
    body = msgspec.json.encode(wire.completion_response("m", "x", 2, 1, stats))
    answer = wire.decode_response(body)
    assert answer.object == "text_completion" and answer.choices[0].finish_reason == "length"
    assert answer.usage.total_tokens == 3 and answer.diffusion == stats
