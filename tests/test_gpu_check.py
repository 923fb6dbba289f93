"""The GPU machine's one prepared command, dry-run on the CPU with a tiny shape: every step of
scripts/gpu-check.sh runs (CUDA tests, which skip here; the speed, concurrency and LSP
sections; the corpus build and a few seconds of training) and gpu.json has every field the
README's GPU figures are read from. The GPU's minutes then go to measuring, not debugging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "eval-data" / "humaneval-infilling"
RETURNED_FILES = 8  # what a device call brings back


def test_without_eval_data_the_gpu_check_fails_at_once_and_says_why(tmp_path):
    """A call without the carried HumanEval files exits non-zero before spending the GPU's
    minutes, and says what is missing (it said "stopped early", exited 0 and left a gpu.json
    without the speed figures)."""
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "WORK": str(tmp_path / "work"),
           "PY": sys.executable, "DATA": str(tmp_path / "no-data")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "no HumanEval-infilling data" in log and str(tmp_path / "no-data") in log


def test_the_speed_sections_without_data_exit_non_zero_with_the_cause(tmp_path, capsys):
    from benchmarks import gpu_check

    status = gpu_check.main(["--out", str(tmp_path / "gpu.json"), "--shape", "tiny-qwen2",
                             "--device", "cpu", "--data", str(tmp_path), "--holes", "1"])
    assert status != 0
    said = capsys.readouterr().out
    assert "HumanEval-infilling data not found" in said and "human-eval-infilling" in said
    assert "data" in json.loads((tmp_path / "gpu.json").read_text())["errors"]


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"needs HumanEval-infilling in {DATA} (only CI "
                    "and the project's machines have ../shared; the GPU check carries it)")
def test_the_gpu_check_runs_through_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "WORK": str(work),
           "PY": sys.executable, "DATA": str(DATA), "DRY_BUDGET_S": "240"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    assert not result.get("errors"), result.get("errors")
    assert result["tests"]["failed"] == 0 and result["tests"]["skipped"] > 0  # no GPU here
    assert {"device", "torch"} <= result.keys()
    hole = result["hole64_7b"]
    assert set(hole["by_tokens_per_step"]) == {"1", "2", "4", "8"}
    for run in hole["by_tokens_per_step"].values():
        assert run["ms_per_step"] > 0 and run["tokens_per_s"] > 0 and run["tokens"] == 64
    assert hole["by_tokens_per_step"]["8"]["steps"] == 8
    assert hole["by_tokens_per_step"]["1"]["steps"] == 64
    assert result["ar_twin_tokens_per_s"] > 0
    switches = hole["switches_at_8"]["runs"]
    assert set(switches) == {"off", "graph_head", "fused_projections", "graph_passes", "all"}
    for run in switches.values():
        assert run["ms_per_step"] > 0 and run["tokens_per_s"] > 0 and run["steps"] == 8
        assert set(run["switches"]) == {"graph_head", "fused_projections", "graph_passes",
                                        "packed_graphs"}
    refresh = hole["refresh_every_0_at_8"]
    for runs in (refresh["switches_off"], refresh["all_switches"]):
        assert runs["default"]["step_kinds"].count("full") == 1  # the refresh at step 5
        assert "full" not in runs["refresh_every_0"]["step_kinds"]
    bundled = refresh["bundled"]
    assert bundled["holes"] > 0 and 0 <= bundled["changed_server_defaults"] <= bundled["holes"]
    assert result["fast_path"]["switches"] == {"graph_head": False, "fused_projections": False,
                                               "graph_passes": False,
                                               "packed_graphs": False}  # unset, and a CPU
    for editors in (4, 16, 64):  # editors against one engine, batched steps packed
        run = result[f"concurrent{editors}"]
        assert run["editors"] == editors and run["completions"] == editors  # 1 each on a CPU
        assert run["p95_ms"] >= run["p50_ms"] > 0 and run["single_p50_ms"] > 0
        assert run["tokens_per_s"] > 0 and run["aggregate_over_single"] > 0
        assert run["hole_tokens"] == 64 and run["tokens_per_step"] == 8
        assert run["document_cache"] and run["packed_steps"]
    graphed = result["concurrent16"]["packed_graphs"]  # the switch on: it falls back on a CPU
    assert graphed["completions"] == 16 and graphed["tokens_per_s"] > 0
    assert not graphed["packed_graphs"] and graphed["captures"] == 0
    assert "DIFFUSION_LSP_PACKED_GRAPHS is ignored on cpu" in log
    assert result["lsp_typing_p50_ms"] > 0 and result["lsp"]["answered"] >= 1
    assert result["profile"]["hole_step"] and result["profile"]["full_pass"]
    block = result["block8b"]  # the 8B block-diffusion shape (tiny here), beside Dream 7B
    assert block["shape"] == "tiny-seed-coder" and block["block_length"] == 4
    assert block["tokens"] == 64 and block["ms_per_step"] > 0 and block["tokens_per_s"] > 0
    assert block["steps"] == 64 and block["write_forwards"] >= 64 // 4  # a write a block
    assert block["dream7b_at_1"]["tokens_per_s"] > 0 and block["bytes_per_step"] > 0
    assert set(block["by_path"]) == {"layer_loop", "block_graphs", "transformers"}
    assert all(path["ms_per_step"] > 0 and path["steps"] == 64
               for path in block["by_path"].values())
    assert block["block_graphs_over_layer_loop"] > 0 and block["block_graphs"]["captures"] == 0
    returned = sorted(p.name for p in out.iterdir())
    assert len(returned) <= RETURNED_FILES, returned
    assert "ckpt-last.pt.part00" in returned and "check.log" in returned, log[-3000:]
    assert all(p.stat().st_size < 16 << 20 for p in out.iterdir())


def test_the_quantization_section_records_each_scheme(tmp_path, monkeypatch):
    """hole64_7b.by_quantization.{int8,int4} with the fields the README's GPU figures are read
    from, dry-run on the CPU with the tiny shape (peak GPU memory: none here)."""
    pytest.importorskip("torchao")
    from benchmarks import gpu_check
    from model.network import quantized_cache

    monkeypatch.setenv(quantized_cache.CACHE_ENV, str(tmp_path / "cache"))
    if not DATA.exists():
        pytest.skip(f"no HumanEval-infilling data at {DATA}")
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out), "--shape", "tiny-qwen2", "--device", "cpu",
                           "--holes", "1", "--data", str(DATA),
                           "--sections", "quantization"]) == 0
    result = json.loads(out.read_text())
    assert not result.get("errors"), result.get("errors")
    runs = result["hole64_7b"]["by_quantization"]
    assert set(runs) == {"int8", "int4"}
    for scheme, run in runs.items():
        assert run["quantization"] == scheme
        assert run["tokens_per_s_at_8"] > 0 and run["ms_per_step"] > 0
        assert {"bound_ms_per_step", "peak_memory_gib"} <= run.keys()
    assert runs["int4"]["bytes_per_step"] < runs["int8"]["bytes_per_step"]
    assert gpu_check.SECTIONS.index("quantization") > gpu_check.SECTIONS.index("lsp")
