"""CPU choices (dtype rule) and the CPU benchmarks (typing, cpu), on tiny models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

import benchmarks.report as report
from benchmarks.cpu_profile import run_cpu_bench
from benchmarks.typing_latency import bench_model, server_options, write_shape_checkpoint
from model.catalog.cpu import BF16_MIN_PARAMETERS, auto_cpu_dtype, cpu_flags
from model.network.loader import load_model, pick_dtype

HALF_B = 494_032_768  # Qwen2.5-0.5B's parameters
HOLES = [
    {"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n    y = x + {i}\n",
     "canonical_solution": f"    return y * {i}\n", "suffix": "\n\nprint(f(1))\n"}
    for i in range(3)
]


def test_auto_dtype_is_bf16_only_for_large_models_on_cpus_with_native_bf16():
    assert auto_cpu_dtype(HALF_B, frozenset({"avx512f", "avx512_bf16"})) == torch.bfloat16
    assert auto_cpu_dtype(HALF_B, frozenset({"amx_bf16", "amx_tile"})) == torch.bfloat16
    assert auto_cpu_dtype(HALF_B, frozenset({"avx512f", "avx2"})) == torch.float32
    assert auto_cpu_dtype(BF16_MIN_PARAMETERS - 1, frozenset({"avx512_bf16"})) == torch.float32
    assert pick_dtype("auto", torch.device("cuda"), 10) == torch.bfloat16


def test_cpu_flags_read_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert "avx512_bf16" in cpu_flags(x86)
    assert "bf16" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_a_small_model_stays_float32_on_any_cpu(tiny_model):
    assert tiny_model.dtype == torch.float32


def test_typing_bench_reuses_each_documents_context(tmp_path):
    model = load_model(write_shape_checkpoint("tiny-qwen2", tmp_path / "shape"), device="cpu")
    assert model.family.name == "dream" and model.dtype == torch.float32
    result = bench_model(model, HOLES[:2], server_options(max_tokens=8, tokens_per_step=4),
                         extra_holes=HOLES[2:])
    assert result["holes"] == 2
    assert result["cached_documents"] == len(HOLES) and result["cache_bytes"] > 0
    assert all(r["typing"]["reused_tokens"] > 0 for r in result["rows"])
    assert all(r["typing_no_cache"]["reused_tokens"] == 0 for r in result["rows"])
    assert all(r["first"]["reused_tokens"] == 0 for r in result["rows"])


def test_cpu_bench_times_each_dtype_and_profiles(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    args = SimpleNamespace(shape="tiny-qwen2", threads=None)
    assert run_cpu_bench(args) == 0
    payload = json.loads((tmp_path / "cpu-profile-tiny-qwen2.json").read_text())
    dtypes = [row["dtype"] for row in payload["milliseconds"]]
    assert dtypes[:2] == ["float32", "bfloat16"]
    assert all(row["hole"] > 0 and row["full"] > 0 for row in payload["milliseconds"])
    assert {"hole", "full"} <= set(payload["profile"])
    assert "saved" in capsys.readouterr().out

