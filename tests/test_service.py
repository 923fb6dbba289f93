"""`diffusion-lsp service`: the pure pieces, then the real service (Ray Serve, the bundled
model, two CPU replicas, loopback) started by its command, used through both APIs and through the
language server's remote backend, and stopped by SIGTERM with nothing left running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import msgspec
import pytest

from diffusion_contract import edit_wire, wire
from diffusion_lsp.service import (
    Metrics,
    ServiceConfig,
    authorized,
    binding_problem,
    infill_options,
    infiller_options,
    token_digest,
)
from lsp_server.backends import BackendError, CompletionJob, NextEditJob
from lsp_server.backends.remote import RemoteBackend
from lsp_server.settings import RemoteSettings, Settings
from model.network.loader import bundled_model_path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "service-test-token"
TOKEN_ENV = "DIFFUSION_LSP_TOKEN"
START_TIMEOUT_S = 240  # Ray, two replicas loading the model, on a busy 2-core machine
STOP_TIMEOUT_S = 60


EIGHT_HOLES = [  # (prefix, suffix): eight holes, each asked one by one and all at once
    ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"),
    ("import os\n\npath = ", "\nprint(path)\n"),
    ("class Point:\n    def __init__(self, x, y):\n        self.x = ", "\n"),
    ("numbers = [1, 2, 3]\ntotal = ", "\nprint(total)\n"),
    ("for i in range(10):\n    ", "\nprint('done')\n"),
    ("def is_even(n):\n    return ", "\n"),
    ("with open('f.txt') as handle:\n    text = ", "\n"),
    ("def greet(name):\n    print(", ")\n"),
]


def _fim(prefix: str, suffix: str) -> dict:
    return {"model": "diffusion-lsp", "prompt": prefix, "suffix": suffix, "max_tokens": 16,
            "temperature": 0}


# -- pure pieces ---------------------------------------------------------------------------------


def test_a_requests_sampler_settings_reach_the_sampler():
    body = (b'{"model": "m", "prompt": "p", "max_tokens": 16, "temperature": 0.5, "seed": 9, '
            b'"algorithm": "low_confidence", "steps": 8, "block_length": 8, "cfg_scale": 1.5, '
            b'"exact": true}')
    options = infill_options(wire.decode_fim(body))
    assert (options.algorithm, options.steps, options.block_length) == ("low_confidence", 8, 8)
    assert (options.temperature, options.seed, options.cfg_scale, options.exact) == (
        0.5, 9, 1.5, True)
    plain = infill_options(wire.decode_fim(b'{"model": "m", "prompt": "p"}'))
    assert plain.algorithm is None and plain.steps is None and not plain.exact


def test_token_check():
    digest = token_digest(TOKEN)
    assert authorized(f"Bearer {TOKEN}", digest)
    assert not authorized("Bearer wrong", digest)
    assert not authorized(None, digest) and not authorized(TOKEN, digest)
    assert authorized(None, None)  # no token set: open (loopback only, see below)


def test_no_binding_beyond_loopback_without_a_token():
    assert binding_problem("127.0.0.1", None) is None
    assert binding_problem("::1", None) is None
    assert "DIFFUSION_LSP_TOKEN" in binding_problem("0.0.0.0", None)
    assert binding_problem("0.0.0.0", "t") is None
    assert binding_problem("localhost", None) is None and binding_problem("127.0.0.2", None) is None
    assert "DIFFUSION_LSP_TOKEN" in binding_problem("example.com", None)


def test_inflight_counts_work_in_progress_however_it_ends():
    metrics = Metrics()
    with metrics.in_flight(), metrics.in_flight():
        assert metrics.snapshot()["inflight"] == 2
    with pytest.raises(RuntimeError), metrics.in_flight():
        raise RuntimeError("a replica failed")
    assert metrics.inflight == 0 and "diffusion_lsp_inflight_requests 0" in metrics.prometheus()


def test_the_command_refuses_to_listen_beyond_loopback_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    done = subprocess.run([sys.executable, "-m", "diffusion_lsp", "service", "--host",
                           "0.0.0.0"], check=False, capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "DIFFUSION_LSP_TOKEN" in done.stderr


def test_replicas_and_resources():
    cpu = infiller_options(ServiceConfig(replicas=2, cpus_per_replica=1), gpus_in_cluster=0)
    assert cpu["num_replicas"] == 2 and cpu["ray_actor_options"] == {"num_cpus": 1}
    gpu = infiller_options(ServiceConfig(), gpus_in_cluster=4)
    assert gpu["num_replicas"] == 4 and gpu["ray_actor_options"]["num_gpus"] == 1
    scaled = infiller_options(ServiceConfig(min_replicas=1, max_replicas=3), 0)
    assert scaled["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in scaled
    with pytest.raises(ValueError):
        ServiceConfig(min_replicas=2)
    with pytest.raises(ValueError):
        ServiceConfig(batching="bogus")


def test_the_serve_run_builder_takes_string_args_and_refuses_typos():
    pytest.importorskip("ray.serve")
    from diffusion_lsp.service import app

    assert type(app({"replicas": "2", "device": "cpu", "max_batch": "8"})).__name__ == \
        "Application"
    with pytest.raises(ValueError, match="replica"):
        app({"replica": "2"})


def test_metrics_text():
    metrics = Metrics()
    metrics.record("/v1/fim/completions", 200)
    for ms in (10.0, 20.0, 30.0):
        metrics.record_completion(ms, wire.DiffusionStats(4, 1, "end", ms / 2, "r1"), 5)
    text = metrics.prometheus()
    assert 'diffusion_lsp_requests_total{endpoint="/v1/fim/completions",status="200"} 1' in text
    assert 'diffusion_lsp_request_latency_ms{quantile="0.5"} 20.000' in text
    assert "diffusion_lsp_request_latency_ms_count 3" in text
    snapshot = metrics.snapshot()
    assert snapshot["latency_ms"]["p95"] == 30.0 and snapshot["by_replica"] == {"r1": 3}


def _request(chunks: list[bytes], headers: dict[str, str], delay_s: float = 0.0):
    """A real starlette Request whose body arrives as `chunks` (each after `delay_s`);
    `received` counts the body messages the app pulled."""
    from starlette.requests import Request

    received = []

    async def receive() -> dict:
        if delay_s:
            await asyncio.sleep(delay_s)
        index = len(received)
        received.append(index)
        more = index + 1 < len(chunks)
        return {"type": "http.request", "body": chunks[index] if chunks else b"",
                "more_body": more}

    scope = {"type": "http", "method": "POST", "path": "/v1/fim/completions",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive), received


def test_an_oversized_body_is_refused_before_it_is_read():
    from diffusion_lsp.service import MAX_BODY_BYTES, Refused, read_body

    request, received = _request([b"x"], {"content-length": str(MAX_BODY_BYTES + 1)})
    with pytest.raises(Refused) as refused:
        asyncio.run(read_body(request))
    assert refused.value.status == 413 and received == []
    request, _ = _request([b"x"], {"content-length": "lots"})
    with pytest.raises(Refused) as refused:
        asyncio.run(read_body(request))
    assert refused.value.status == 400 and "Content-Length" in str(refused.value)


def test_a_chunked_body_is_cut_off_at_the_limit():
    from diffusion_lsp.service import Refused, read_body

    request, received = _request([b"x" * 1000] * 100, {"transfer-encoding": "chunked"})
    with pytest.raises(Refused) as refused:
        asyncio.run(read_body(request, limit=5000))
    assert refused.value.status == 413 and len(received) == 6  # stopped at the limit
    request, _ = _request([b"ab", b"cd"], {"transfer-encoding": "chunked"})
    assert asyncio.run(read_body(request)) == b"abcd"


def test_a_trickling_body_times_out():
    from diffusion_lsp.service import Refused, read_body

    request, received = _request([b"x"] * 50, {"content-length": "50"}, delay_s=0.05)
    with pytest.raises(Refused) as refused:
        asyncio.run(read_body(request, timeout_s=0.5))
    # 50 parts 50 ms apart take 2.5 s at least: refused before the body ended, at any load
    assert refused.value.status == 408 and len(received) < 50


# -- the real service ----------------------------------------------------------------------------


# -- a replica in this process (no Ray): the gateway and the Infiller as the service runs them --


class _InProcess:
    """A replica called the Ray Serve way (`await replica.fill.remote(body)`), in this process."""

    def __init__(self, replica) -> None:
        self.replica = replica

    def __getattr__(self, name: str):
        return SimpleNamespace(remote=getattr(self.replica, name))


@pytest.fixture(scope="module")
def in_process(tiny_dirs):
    """The gateway in front of one real replica (its model and engine) in this process: the
    bundled model, as users get it; the tiny random one where none is installed."""
    from diffusion_lsp.service import Gateway, Infiller

    model = None if bundled_model_path() else str(tiny_dirs["default"])
    config = ServiceConfig(model=model, device="cpu")
    replica = Infiller(config, "cpu")
    yield Gateway(_InProcess(replica), config, 1), replica
    replica.engine.close()


async def _ask(gateway, body: dict):
    request, _ = _request([msgspec.json.encode(body)], {"content-type": "application/json"})
    return await gateway(request)


def _texts(answers) -> list[str]:
    assert [a.status_code for a in answers] == [200] * len(answers)
    return [msgspec.json.decode(a.body)["choices"][0]["text"] for a in answers]


def test_the_service_gives_the_same_completions_to_8_holes_one_by_one_and_all_at_once(
        in_process):
    gateway, replica = in_process

    async def one_by_one() -> list:
        return [await _ask(gateway, _fim(*hole)) for hole in EIGHT_HOLES]

    async def all_at_once() -> list:
        return await asyncio.gather(*(_ask(gateway, _fim(*hole)) for hole in EIGHT_HOLES))

    passes, rows = replica.engine.forward_passes, replica.engine.batched_rows
    alone = _texts(asyncio.run(one_by_one()))
    assert replica.engine.batched_rows - rows == replica.engine.forward_passes - passes
    passes, rows = replica.engine.forward_passes, replica.engine.batched_rows
    together = _texts(asyncio.run(all_at_once()))
    assert replica.engine.batched_rows - rows > replica.engine.forward_passes - passes  # batched
    assert together == alone


@pytest.mark.parametrize("family", ["stable-diffcoder", "fast-dllm-v2"])
def test_a_replica_serves_the_block_diffusion_families(tmp_path, family):
    """A replica on a tiny Stable-DiffCoder / Fast-dLLM v2 checkpoint (published formats)
    answers FIM requests, the same whether they come one by one or together (batched)."""
    from diffusion_lsp.service import Gateway, Infiller
    from tests.fixtures_block import write_stable_diffcoder
    from tests.fixtures_fast_dllm import write_fast_dllm_v2

    write = write_fast_dllm_v2 if family == "fast-dllm-v2" else write_stable_diffcoder
    config = ServiceConfig(model=str(write(tmp_path / "m")), device="cpu")
    replica = Infiller(config, "cpu")
    holes = EIGHT_HOLES[:4]
    try:
        gateway = Gateway(_InProcess(replica), config, 1)
        assert family in replica.description

        async def together() -> list:
            return await asyncio.gather(*(_ask(gateway, _fim(*hole)) for hole in holes))

        alone = [_texts([asyncio.run(_ask(gateway, _fim(*hole)))])[0] for hole in holes]
        assert _texts(asyncio.run(together())) == alone
    finally:
        replica.engine.close()


def test_past_the_queue_the_service_answers_429_with_retry_after_and_counts_it(
        in_process, monkeypatch):
    gateway, replica = in_process
    monkeypatch.setattr(replica.engine, "max_queued", 0)  # every request finds the queue full
    answer = asyncio.run(_ask(gateway, _fim(*EIGHT_HOLES[0])))
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
    assert msgspec.json.decode(answer.body)["error"]["code"] == "overloaded"
    assert gateway.metrics.snapshot()["queue_full"] == 1
    assert "diffusion_lsp_queue_full_total 1" in gateway.metrics.prometheus()
    monkeypatch.undo()
    assert asyncio.run(_ask(gateway, _fim(*EIGHT_HOLES[0]))).status_code == 200

    class BackPressureError(Exception):  # Ray's, when its router queue (max_queued) is full
        pass

    assert gateway._failure(BackPressureError()).status_code == 429
    assert gateway.metrics.snapshot()["queue_full"] == 2


def test_ray_bounds_a_replicas_batch_and_the_queue_and_a_bad_bound_is_refused():
    options = infiller_options(ServiceConfig(max_batch=8, max_queued=4), 0)
    assert options["max_ongoing_requests"] == 8 and options["max_queued_requests"] == 4
    with pytest.raises(ValueError, match="queued"):
        ServiceConfig(max_queued=-1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def service(tiny_dirs, tmp_path_factory):
    """The service, started as a user would; stopped with SIGTERM at the end of the module."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the process checks read /proc")
    pytest.importorskip("ray.serve")
    port = _free_port()
    # the bundled model, as users get it; the tiny random one where none is installed
    model = [] if bundled_model_path() else ["--model", str(tiny_dirs["default"])]
    log_file = tmp_path_factory.mktemp("service") / "service.log"
    env = os.environ | {TOKEN_ENV: TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "diffusion_lsp", "service", "--port", str(port),
             "--replicas", "2", "--num-cpus", "2", "--device", "cpu", *model,
             "--log-level", "WARNING"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"the service exited ({process.returncode}):\n{log_file.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the service did not start:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "process": process, "log": log_file,
           "tree": _descendants(process.pid)}
    if process.poll() is None:  # the stop test did not run: stop it anyway
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()


AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIM = {"model": "diffusion-lsp", "prompt": "def add(a, b):\n    return ",
       "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 12}


@pytest.mark.slow
def test_health_needs_no_token_and_names_the_service(service):
    answer = httpx.get(service["url"] + "/health", timeout=10)
    health = answer.json()
    assert answer.status_code == 200 and health["status"] == "ok"
    assert health["service"] == "diffusion-lsp" and health["replicas"] == 2


@pytest.mark.slow
def test_fim_api_answers(service):
    answer = httpx.post(service["url"] + "/v1/fim/completions", json=FIM, headers=AUTH,
                        timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion" and body["model"] == "diffusion-lsp"
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == (
        usage["prompt_tokens"] + usage["completion_tokens"])
    assert body["diffusion"]["steps"] >= 1


@pytest.mark.slow
def test_openai_completions_api_answers(service):
    request = {"model": "diffusion-lsp", "prompt": "x = ", "suffix": "\n", "max_tokens": 6,
               "stop": ["\n"]}
    answer = httpx.post(service["url"] + "/v1/completions", json=request, headers=AUTH,
                        timeout=60)
    assert answer.status_code == 200, answer.text
    assert "\n" not in answer.json()["choices"][0]["text"]


EDIT_PROMPT = edit_wire.EditPrompt(
    "shapes.py", "", "def area(w, height):\n    return width * height", 10,
    "\n\nprint(area(2, 3))\n",
    ("--- shapes.py\n+++ shapes.py\n@@ -1,2 +1,2 @@\n-def area(width, height):\n"
     "+def area(w, height):\n     return width * height\n",))


@pytest.mark.slow
def test_the_edit_api_answers_in_inceptions_shape(service):
    body = msgspec.to_builtins(edit_wire.edit_request("diffusion-lsp", EDIT_PROMPT, 64))
    answer = httpx.post(service["url"] + "/v1/edit/completions", json=body, headers=AUTH,
                        timeout=60)
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    assert reply["object"] == "chat.completion" and reply["model"] == "diffusion-lsp"
    content = reply["choices"][0]["message"]["content"]
    assert content.startswith("```\n") and content.endswith("\n```")
    region = edit_wire.region_of_answer(content)
    assert region is not None and region.strip()  # the region, re-denoised by the model
    assert reply["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("body, status, reason", [
    ({"model": "m", "messages": []}, 400, "exactly one message"),
    ({"model": "m", "messages": [{"role": "user", "content": "no sections"}]}, 400,
     "current_file_content"),
    ({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}, 400,
     "stream"),
])
def test_bad_edit_requests_are_400_with_a_reason(service, body, status, reason):
    answer = httpx.post(service["url"] + "/v1/edit/completions", json=body, headers=AUTH,
                        timeout=30)
    assert answer.status_code == status and reason in answer.json()["error"]["message"]
    assert httpx.post(service["url"] + "/v1/edit/completions", json=body,
                      timeout=30).status_code == 401


@pytest.mark.slow
def test_bad_requests_are_400_with_a_reason(service):
    answer = httpx.post(service["url"] + "/v1/completions", json=FIM | {"stream": True},
                        headers=AUTH, timeout=30)
    assert answer.status_code == 400 and "stream" in answer.json()["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}])
@pytest.mark.parametrize("path", ["/v1/fim/completions", "/v1/completions", "/metrics",
                                  "/v1/models"])
def test_a_missing_or_wrong_token_is_401(service, headers, path):
    call = httpx.get if path in ("/metrics", "/v1/models") else httpx.post
    kwargs = {} if call is httpx.get else {"json": FIM}
    answer = call(service["url"] + path, headers=headers, timeout=30, **kwargs)
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"


@pytest.mark.slow
def test_8_holes_get_the_same_completions_one_by_one_and_all_at_once(service):
    async def ask(client, hole):
        answer = await client.post(service["url"] + "/v1/fim/completions", json=_fim(*hole))
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"]

    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            alone = [await ask(client, hole) for hole in EIGHT_HOLES]
            together = await asyncio.gather(*(ask(client, hole) for hole in EIGHT_HOLES))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone


@pytest.mark.slow
def test_both_replicas_serve_concurrent_requests_and_metrics_count_them(service):
    async def burst() -> list[int]:
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            answers = await asyncio.gather(*(
                client.post(service["url"] + "/v1/fim/completions", json=FIM)
                for _ in range(24)))
        return [answer.status_code for answer in answers]

    assert asyncio.run(burst()) == [200] * 24
    snapshot = httpx.get(service["url"] + "/metrics?format=json", headers=AUTH,
                         timeout=30).json()
    assert len(snapshot["by_replica"]) == 2, snapshot
    assert snapshot["completions"] >= 24 and snapshot["latency_ms"]["p95"] > 0
    text = httpx.get(service["url"] + "/metrics", headers=AUTH, timeout=30).text
    assert "diffusion_lsp_request_latency_ms{quantile=\"0.95\"}" in text
    assert 'diffusion_lsp_requests_total{endpoint="/v1/fim/completions",status="200"}' in text


def _raw_exchange(url: str, head: bytes, body_parts: tuple[bytes, ...] = (),
                  pause_s: float = 0.0, timeout_s: float = 60.0) -> tuple[bytes, int]:
    """Send `head` (request line and headers) then `body_parts` one by one with `pause_s`
    between them, over a raw socket; returns (whatever came back, how many parts were sent
    before it did)."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head)
        answer = b""
        for part in body_parts:
            sock.settimeout(pause_s or 0.01)
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(65536)
            if answer:
                break
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed
                break
            sent += 1
        sock.settimeout(timeout_s)
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer, sent


def _head(content_length: int | str, extra: str = "") -> bytes:
    return (f"POST /v1/fim/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {content_length}\r\n{extra}\r\n").encode()


@pytest.mark.slow
def test_an_oversized_body_is_refused_with_413_before_it_is_sent(service):
    answer, _ = _raw_exchange(service["url"], _head(10**12))  # no body ever follows
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]  # so it was refused unread


@pytest.mark.slow
def test_an_oversized_chunked_body_is_refused_with_413(service):
    def chunks():
        for _ in range(6):
            yield b" " * (1024 * 1024)

    answer = httpx.post(service["url"] + "/v1/fim/completions", content=chunks(),
                        headers=AUTH | {"Content-Type": "application/json"}, timeout=60)
    assert answer.status_code == 413 and "limit" in answer.json()["error"]["message"]


@pytest.mark.slow
def test_malformed_json_is_400_with_the_reason(service):
    answer = httpx.post(service["url"] + "/v1/fim/completions", content=b'{"prompt": "x",',
                        headers=AUTH | {"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == 400
    assert "bad request body" in answer.json()["error"]["message"]


@pytest.mark.slow
def test_a_slowloris_body_is_cut_off_and_others_are_served_meanwhile(service):
    from diffusion_lsp.service import BODY_READ_TIMEOUT_S

    slow = {}

    def trickle() -> None:
        slow["answer"], slow["sent"] = _raw_exchange(
            service["url"], _head(200), tuple(b" " for _ in range(100)), pause_s=1.0)

    thread = threading.Thread(target=trickle)
    thread.start()
    time.sleep(1.0)
    answer = httpx.post(service["url"] + "/v1/fim/completions", json=FIM, headers=AUTH,
                        timeout=60)
    assert answer.status_code == 200  # the slow client holds nothing others need
    thread.join(60)
    assert slow["answer"].startswith(b"HTTP/1.1 408"), slow["answer"][:200]
    # cut off before its body ended (100 parts a second apart outlast the read timeout)
    assert BODY_READ_TIMEOUT_S < 100 and slow["sent"] < 100


def _replica_pids(service) -> set[int]:
    pids = set()
    for pid in _descendants(service["process"].pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ServeReplica" in command and _alive(pid):
            pids.add(pid)
    return pids


@pytest.mark.slow
def test_a_thousand_concurrent_connections_kill_no_replica(service):
    """1,000 connections at once, each with a completion: every one is answered (200, 429 with
    Retry-After when the queue is full, or 408 when a loaded machine's gateway gets to a body
    later than BODY_READ_TIMEOUT_S), and the same replica processes serve after."""
    before = _replica_pids(service)
    assert len(before) >= 2, before  # the gateway and the model replicas

    async def flood() -> list:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        hole = FIM | {"max_tokens": 2}
        async with httpx.AsyncClient(headers=AUTH, timeout=180, limits=limits) as client:
            async def one():
                try:
                    answer = await client.post(service["url"] + "/v1/fim/completions",
                                               json=hole)
                except httpx.HTTPError as error:
                    return type(error).__name__
                return answer.status_code, answer.headers.get("retry-after")
            return await asyncio.gather(*(one() for _ in range(1000)))

    outcomes = asyncio.run(flood())
    statuses = [outcome[0] if isinstance(outcome, tuple) else outcome for outcome in outcomes]
    assert set(statuses) <= {200, 429, 408}, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(200) >= 100
    assert all(retry == "1" for status, retry in outcomes if status == 429)
    assert _replica_pids(service) == before  # none died (Ray would restart it as another)
    assert httpx.post(service["url"] + "/v1/fim/completions", json=FIM, headers=AUTH,
                      timeout=60).status_code == 200


@pytest.mark.slow
def test_the_token_is_never_logged(service):
    httpx.post(service["url"] + "/v1/fim/completions", json=FIM,
               headers={"Authorization": "Bearer not-the-token-7f3a"}, timeout=30)
    log = service["log"].read_text()
    assert TOKEN not in log and "not-the-token-7f3a" not in log


def _remote_settings(url: str, **remote) -> Settings:
    return Settings(backend="remote", remote=RemoteSettings(url=url, **remote))


@pytest.mark.slow
@pytest.mark.parametrize("api", ["fim", "completions"])
async def test_remote_backend_end_to_end(service, monkeypatch, api):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    backend = RemoteBackend()
    description = await backend.start(
        _remote_settings(service["url"], api=api, timeout_ms=30_000), lambda m: None)
    assert "diffusion-lsp service" in description and "2 replicas" in description
    job = CompletionJob(prefix=FIM["prompt"], suffix=FIM["suffix"], max_tokens=8,
                        single_line=True, threshold=0.5)
    outcome = await backend.complete(job)
    await backend.close()
    assert isinstance(outcome.text, str) and "\n" not in outcome.text
    assert outcome.steps >= 1 and outcome.extra["replica"]  # our service says how it filled


@pytest.mark.slow
def test_fim_stream_sends_each_step_then_the_answer(service):
    request = FIM | {"stream": True, "tokens_per_step": 1, "max_tokens": 6}
    with httpx.stream("POST", service["url"] + "/v1/fim/completions", json=request,
                      headers=AUTH, timeout=60) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in answer.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    chunks = [wire.decode_chunk(item) for item in data[:-1]]
    *steps, final = chunks
    assert all(c.choices[0].finish_reason is None for c in steps)
    assert [c.diffusion.step for c in steps] == list(range(1, len(steps) + 1))
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.diffusion.step == len(steps) + 1 and final.usage.total_tokens > 0
    if steps:
        assert "\u2591" in steps[0].choices[0].text  # one token a step: masks remain


@pytest.mark.slow
async def test_remote_backend_turns_the_stream_into_previews(service, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    backend = RemoteBackend()
    await backend.start(_remote_settings(service["url"], timeout_ms=30_000), lambda m: None)
    previews = []
    job = CompletionJob(prefix=FIM["prompt"], suffix=FIM["suffix"], max_tokens=6,
                        single_line=False, tokens_per_step=1,
                        on_step=lambda *step: previews.append(step))
    outcome = await backend.complete(job)
    await backend.close()
    assert outcome.extra["streamed"] and outcome.steps >= 1
    assert [step for step, _, _ in previews] == list(range(1, outcome.steps))


@pytest.mark.slow
async def test_remote_backend_next_edits_from_our_service(service, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    backend = RemoteBackend()
    await backend.start(_remote_settings(service["url"], timeout_ms=30_000), lambda m: None)
    outcome = await backend.next_edit(NextEditJob(EDIT_PROMPT, max_tokens=64))
    await backend.close()
    assert outcome.region is not None and outcome.region.strip()


@pytest.mark.slow
async def test_remote_backend_with_a_wrong_token_is_unauthorized(service, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    backend = RemoteBackend()
    with pytest.raises(BackendError) as raised:
        await backend.start(_remote_settings(service["url"]), lambda m: None)
    assert raised.value.kind == "unauthorized" and "401" in str(raised.value)
    await backend.close()


@pytest.mark.slow
async def test_a_cancelled_completion_leaves_the_service_healthy(service, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    backend = RemoteBackend()
    await backend.start(_remote_settings(service["url"], timeout_ms=30_000), lambda m: None)
    job = CompletionJob(prefix=FIM["prompt"], suffix=FIM["suffix"], max_tokens=256,
                        single_line=False, tokens_per_step=1)
    tasks = [asyncio.create_task(backend.complete(job)) for _ in range(4)]
    await asyncio.sleep(0.3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    outcome = await backend.complete(CompletionJob(prefix="x = ", suffix="\n", max_tokens=4,
                                                   single_line=True))
    await backend.close()
    assert isinstance(outcome.text, str)


@pytest.mark.slow
def test_sigterm_stops_everything_it_started(service):
    """Runs last in this module: the service is gone afterwards."""
    process, tree = service["process"], service["tree"] | _descendants(service["process"].pid)
    assert len(tree) >= 5  # Ray's processes and the replicas really were below it

    async def in_flight_then_sigterm() -> list:
        hole = FIM | {"max_tokens": 48, "threshold": 1.0}  # several steps each
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            requests = [asyncio.ensure_future(client.post(
                service["url"] + "/v1/fim/completions", json=hole)) for _ in range(8)]
            await asyncio.sleep(0.5)  # sent and being served
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*requests, return_exceptions=True)

    answers = asyncio.run(in_flight_then_sigterm())
    drained = [getattr(answer, "status_code", repr(answer)) for answer in answers]
    code = process.wait(STOP_TIMEOUT_S)
    assert drained == [200] * 8, drained  # requests in flight at SIGTERM were completed
    assert code == 0, service["log"].read_text()[-3000:]
    deadline = time.monotonic() + 10
    while (left := [pid for pid in tree if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running after stop: {left}"
    assert "stopped" in service["log"].read_text()
