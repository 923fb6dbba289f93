"""The speed benchmarks run end to end and write their results (tiny model, two holes)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import benchmarks.model_speed as bench
import benchmarks.report as report

pytestmark = pytest.mark.skipif(not report.EVAL_DATA.exists(), reason="../shared eval data absent")


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
