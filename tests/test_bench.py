"""The speed benchmarks run end to end and write their results (tiny model, two holes)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import benchmarks.model_speed as bench
import benchmarks.report as report

needs_eval_data = pytest.mark.skipif(not report.EVAL_DATA.exists(),
                                     reason="../shared eval data absent")


@needs_eval_data
@pytest.mark.parametrize("name", ["latency", "throughput", "vs-autoregressive"])
def test_bench_writes_json(tiny_dirs, tmp_path, monkeypatch, capsys, name):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    args = SimpleNamespace(name=name, model=str(tiny_dirs["default"]), family=None, device="cpu",
                           dtype="auto", data=None, limit=2, max_tokens=6, tokens_per_step=2,
                           threads=None, shape=None)
    assert bench.run_bench(args) == 0
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert payload["machine"]["cpu"]
    if name == "latency":
        assert {r["split"] for r in payload["runs"]} == {"single-line", "multi-line"}
        assert all(r["forward_pass_equivalents_p50"] > 0 for r in payload["runs"])
    elif name == "throughput":
        assert [r["concurrency"] for r in payload["runs"]] == [1, 2, 4, 8, 16]
    else:
        assert payload["speedup_p50"] > 0
    assert "saved" in capsys.readouterr().out


def test_cache_agreement_covers_every_family_and_mode(tiny_models, tmp_path, monkeypatch, capsys):
    holes = [{"task_id": "a", "prompt": "def add(a, b):\n    return ", "suffix": "\n"},
             {"task_id": "b", "prompt": "import os\npath = ", "suffix": "\nprint(path)\n"}]
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "load_holes", lambda split, limit, data: holes[:limit])
    monkeypatch.setattr(bench, "agreement_models", lambda bundled, workdir: {
        f"tiny-{name}": model for name, model in tiny_models.items()})
    args = SimpleNamespace(name="cache-agreement", model=None, family=None,
                           device="cpu", dtype="auto", data=None, limit=1, max_tokens=4,
                           tokens_per_step=None, threads=None, shape=None)
    assert bench.run_bench(args) == 0
    payload = json.loads((tmp_path / "cache-agreement.json").read_text())
    runs = payload["runs"]
    assert {r["family"] for r in runs} == {"default", "dream", "llada"}
    assert {(r["split"], str(r["settings"])) for r in runs} == {
        (split, str(settings)) for split in ("single-line", "multi-line")
        for settings in ("defaults", bench.AGREEMENT_REFERENCE)}
    for run in runs:
        modes = run["modes"]
        assert set(modes) == set(bench.AGREEMENT_MODES)
        assert modes["exact"]["text_differs_from_exact"] == 0
        assert 0 <= modes["default"]["text_differs_from_no_cache"] <= run["holes"] == 1
    assert "cache changes text" in capsys.readouterr().out


def test_bench_typing_serves_the_quantization_it_is_given(monkeypatch):
    """`bench typing --quantization int8` times a server that loads int8, not `auto`."""
    import asyncio
    import contextlib

    from benchmarks import lsp_client, typing_latency

    seen = {}

    @contextlib.asynccontextmanager
    async def running_server(settings, checkout=None):
        seen.update(settings)
        yield object()

    async def stats(client):
        return {}

    monkeypatch.setattr(lsp_client, "running_server", running_server)
    async def type_one(client, index, hole, next_edits):
        return {"first_ms": 1.0, "typing_ms": 1.0}

    monkeypatch.setattr(lsp_client, "stats", stats)
    monkeypatch.setattr(typing_latency, "type_one", type_one)
    options = typing_latency.server_options()
    asyncio.run(typing_latency.bench_lsp([{}], "/some/model", options, quantization="int8"))
    assert seen["model"] == {"device": "auto", "quantization": "int8", "path": "/some/model"}


@pytest.mark.slow
def test_bench_load_drives_1_2_4_editors_both_ways_and_writes_the_table(tmp_path, monkeypatch,
                                                                        capsys):
    """`bench load` on a tiny shape: every level measured, packed (first passes too, and
    apart) and through transformers side by side, with p50 / p95 / one editor's p50 /
    aggregate tokens/s."""
    from benchmarks.load_test import run_load_bench

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    args = SimpleNamespace(model=None, shape="tiny-qwen2", device="cpu", quantization="none",
                           threads=None, data=str(tmp_path / "no-data"), limit=2,
                           max_tokens=8, tokens_per_step=4, rounds=1)
    assert run_load_bench(args) == 0
    payload = json.loads((tmp_path / "load-tiny-qwen2.json").read_text())
    rows = {(r["editors"], r["batching"]): r for r in payload["rows"]}
    assert set(rows) == {(1, "alone")} | {(editors, mode) for editors in (2, 4) for mode in
                                          ("packed", "first-apart", "transformers")}
    for (editors, _), row in rows.items():
        assert row["completions"] == editors * 2  # requests a round
        assert row["p95_ms"] >= row["p50_ms"] > 0 and row["single_p50_ms"] > 0
        assert row["tokens_per_s"] > 0 and row["aggregate_over_one_by_one"] > 0
    assert rows[(1, "alone")]["aggregate_over_one_by_one"] == 1.0
    assert payload["document_cache"] and payload["machine"]["cpu"]
    assert "vs alone" in capsys.readouterr().out
