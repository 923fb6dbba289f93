"""`diffusion-lsp doctor [--json]`: what this machine has, what is on disk, whether the remote
answers, whether an editor finds the server, and which model to run here. Offline: the only
remotes are stand-ins on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from lsp_server.doctor import check_models, check_path, check_remote, describe
from lsp_server.settings import RemoteSettings
from model.catalog.machine import GPU_GIB_FOR_7B, Gpu, Machine, recommend
from model.catalog.registry import MEASURED, SUPPORTED_MODELS
from tests.remote_standin import KEY, StandIn

CLI = [sys.executable, "-m", "diffusion_lsp", "doctor"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine(gpus=(), ram=16.0, bf16=True) -> Machine:
    return Machine(python="3.11", system="Linux x86_64", cpu_cores=8, memory_gib=ram,
                   torch="2.13.0", torch_build="cuda 12.4" if gpus else "cpu",
                   cuda_available=bool(gpus), gpus=tuple(gpus), cpu_native_bf16=bf16,
                   cpu_flags_bf16=("avx512_bf16",) if bf16 else ())


def run_doctor(cache: Path, *args: str) -> str:
    """`diffusion-lsp doctor ARGS` outside the repository, offline, with an empty model cache
    and the remote on a closed loopback port; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([*CLI, *args, "--remote-url", f"http://127.0.0.1:{closed_port()}"],
                          capture_output=True, text=True, env=env, cwd=cache.parent,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_json_has_device_torch_models_and_a_recommendation(tmp_path):
    report = json.loads(run_doctor(tmp_path / "empty-cache", "--json"))
    assert report["device"]["auto"] in ("cpu", "cuda")
    assert report["torch"]["version"] and report["torch"]["build"]
    assert report["models"][0] == {"name": "bundled", "where": "bundled", "state": "ready",
                                   "path": report["models"][0]["path"], "family": "default"}
    assert report["model_cache"] == str(tmp_path / "empty-cache")
    assert report["remote"]["reachable"] is False and report["remote"]["key_present"] is False
    assert report["recommendation"]["model"] in {m.name for m in SUPPORTED_MODELS} | {"bundled"}
    assert report["recommendation"]["command"].startswith("diffusion-lsp ")


def test_plain_lines_say_the_same_for_people(tmp_path):
    text = run_doctor(tmp_path / "cache")
    for heading in ("python ", "torch ", "GPU ", "bf16 (CPU) ", "models ", "remote ",
                    "on PATH ", "recommended: "):
        assert heading in text, (heading, text)
    assert "not reachable" in text


def test_a_pulled_model_in_the_cache_is_listed_with_its_state(tmp_path, monkeypatch):
    snapshot = tmp_path / "models--fredzzp--open-dcoder-0.5B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    partial = tmp_path / "models--apple--DiffuCoder-7B-cpGRPO" / "blobs"
    partial.mkdir(parents=True)
    (partial / "0123.incomplete").write_bytes(b"x" * 10)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    models, cache = check_models()
    states = {m["name"]: (m["state"], m["path"]) for m in models}
    assert cache == str(tmp_path)
    assert states["Open-dCoder-0.5B"] == ("ready", str(snapshot))
    assert states["DiffuCoder-7B-cpGRPO"] == ("partial", None)
    assert "Dream-Coder-v0-Instruct-7B" not in states  # absent models are not listed


def test_the_recommendation_follows_the_hardware_and_quotes_the_measured_table():
    big = recommend(machine([Gpu("H100", 80.0)]))
    assert big.model == "DiffuCoder-7B-cpGRPO" and "H200" in big.expect + str(big.measured)
    assert "Stable-DiffCoder-8B-Base" in big.why  # the block-diffusion family fits there too
    tiny_gpu = recommend(machine([Gpu("GTX 1650", 4.0)]))
    assert "Stable-DiffCoder" not in tiny_gpu.why
    assert "Stable-DiffCoder" not in recommend(machine()).why
    assert tiny_gpu.model == "Open-dCoder-0.5B" and f"{GPU_GIB_FOR_7B:.0f} GiB" in tiny_gpu.why
    cpu = recommend(machine())
    typing = next(m for m in MEASURED if m.model == "Open-dCoder-0.5B"
                  and m.hardware == "cpu-bf16")
    assert cpu.model == "Open-dCoder-0.5B" and cpu.measured == typing
    assert cpu.expect == typing.figure  # the figure as measured, with where and how to rerun
    slow_cpu = recommend(machine(bf16=False))
    assert slow_cpu.model == "Open-dCoder-0.5B" and "int8" in slow_cpu.expect
    assert slow_cpu.measured.hardware == "cpu" and "8-bit" in slow_cpu.why


def test_a_7b_model_is_recommended_in_8_or_4_bits_where_bf16_does_not_fit():
    """The cards most developers own (8-16 GB) run a 7B coder in 8 or 4 bits."""
    for card, memory, scheme in (("RTX 4070", 12.0, "int8"), ("RTX 4060 Ti", 16.0, "int8"),
                                 ("RTX 3050", 8.0, "int4")):
        advice = recommend(machine([Gpu(card, memory)]))
        assert advice.model == "DiffuCoder-7B-cpGRPO", card
        assert f"--quantization {scheme}" in advice.command and scheme in advice.why, card
        assert "not measured" in advice.expect
        assert "Stable-DiffCoder-8B-Base fits too" in advice.why, card
    assert recommend(machine([Gpu("H100", 80.0)])).command.endswith("cpGRPO")  # bf16 there
    tiny = recommend(machine(ram=2.0))
    assert tiny.model == "bundled" and tiny.command == "diffusion-lsp serve"


def test_every_measured_row_names_a_known_model_and_how_to_rerun_it():
    known = {m.name for m in SUPPORTED_MODELS} | {"bundled"}
    for row in MEASURED:
        assert row.model in known and row.hardware in ("cpu", "cpu-bf16", "gpu")
        assert row.command.startswith(("diffusion-lsp bench ", "OUT=results scripts/gpu-check.sh"))
        assert row.machine


async def _check_remote_against_standin(**remote) -> dict:
    async with StandIn(ours=True) as standin:
        settings = RemoteSettings(url=standin.url, **remote)
        report = await asyncio.to_thread(check_remote, settings, 5.0)
        return report | {"seen": [(s.path, s.headers.get("authorization")) for s in standin.seen]}


def test_a_reachable_remote_and_its_key(monkeypatch):
    monkeypatch.setenv("DOCTOR_TEST_KEY", KEY)
    report = asyncio.run(_check_remote_against_standin(api_key_env="DOCTOR_TEST_KEY"))
    assert report["reachable"] is True and report["key_present"] is True
    assert report["detail"] == "HTTP 200 from /health"
    assert report["seen"] == [("/health", f"Bearer {KEY}")]  # loopback: the key may travel
    assert KEY not in json.dumps({k: v for k, v in report.items() if k != "seen"})
    monkeypatch.delenv("DOCTOR_TEST_KEY")
    report = asyncio.run(_check_remote_against_standin(api_key_env="DOCTOR_TEST_KEY"))
    assert report["key_present"] is False
    assert report["detail"] == "HTTP 401 from /health (a key is needed)"


def test_a_remote_that_never_answers_is_reported_not_waited_for():
    """A listener that accepts and never answers: the probe gives up at its timeout and says
    so (a hang would fail the thread's join guard below)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(check_remote(RemoteSettings(url=url), 0.3)))
        worker.start()
        worker.join(60)
    assert not worker.is_alive()
    assert result["reachable"] is False and "no answer within 300 ms" in result["detail"]


def test_a_bad_remote_url_is_reported():
    report = check_remote(RemoteSettings(url="ftp://nowhere"))
    assert report["reachable"] is None and "http(s)://host" in report["detail"]


def test_path_says_whether_an_editor_finds_the_server(tmp_path):
    assert check_path({"PATH": str(tmp_path)})["on_path"] is None
    fake = tmp_path / "diffusion-lsp"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    found = check_path({"PATH": str(tmp_path)})
    assert found["on_path"] == str(fake) and found["same"] is False


def test_describe_points_a_server_that_is_not_on_path_at_this_installation(tmp_path):
    report = {
        "python": "3.11", "system": "Linux x86_64",
        "torch": {"version": "2.13.0+cpu", "build": "cpu"},
        "device": {"auto": "cpu", "cuda_available": False, "gpus": [], "cpu_cores": 2,
                   "memory_gib": 8.0, "cpu_native_bf16": False, "cpu_bf16_flags": []},
        "models": [{"name": "bundled", "where": "bundled", "state": "ready", "path": "/b",
                    "family": "default"},
                   {"name": "LLaDA-8B-Base", "where": "cache", "state": "partial", "path": None,
                    "family": "llada"}],
        "model_cache": "/c", "remote": {"url": "http://x:1", "api_key_env": "K",
                                        "key_present": False, "reachable": False,
                                        "detail": "refused"},
        "mercury_key_present": True,
        "path": {"on_path": None, "this_install": "/venv/bin/diffusion-lsp", "same": False},
        "recommendation": {"model": "bundled", "why": "w", "expect": "e", "command": "c",
                           "measured": None},
    }
    text = describe(report)
    assert "no: point the editor at /venv/bin/diffusion-lsp" in text
    assert "LLaDA-8B-Base: partial; run `diffusion-lsp pull` again" in text
    assert "not native: models run in fp32" in text
    assert "key INCEPTION_API_KEY: set" in text
    assert Path("/c").as_posix() in text


def test_an_unconfigured_remote_is_not_probed_nor_called_unreachable(tmp_path):
    """Without --remote-url and without a key, there is no remote to check: the doctor says so
    instead of warning that the default URL does not answer."""
    env = {key: value for key, value in os.environ.items() if key != "DIFFUSION_LSP_TOKEN"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(CLI, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "not reachable" not in done.stdout
    assert "remote      none configured" in done.stdout
