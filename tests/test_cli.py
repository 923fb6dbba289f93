"""The `infill` and `demo` commands, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusion_lsp", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_infill_round_trip_with_a_malformed_line(tiny_dirs, tmp_path):
    records = [
        json.dumps({"id": "a", "prefix": "def f(x):\n    return ", "suffix": "\n"}),
        "{not json",
        json.dumps({"id": "c", "prefix": 3}),
        "",
        json.dumps({"id": 7, "prefix": "import ", "suffix": "\n"}),
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(records) + "\n")
    done = run_cli("infill", "--input", str(source), "--output", str(target),
                   "--model", str(tiny_dirs["default"]), "--max-tokens", "8", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in out] == ["a", 2, "c", 7]
    assert "error" in out[1] and "error" in out[2]
    for record in (out[0], out[3]):
        assert set(record) >= {"completion", "steps", "latency_ms"}
        assert 1 <= record["steps"] <= 8


def test_infill_missing_model_is_one_clear_error(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prefix": "x", "suffix": ""}\n')
    done = run_cli("infill", "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                   "--model", str(tmp_path / "no-such-model"))
    assert done.returncode == 1
    assert "no-such-model" in done.stderr and "Traceback" not in done.stderr


def test_demo_shows_the_denoising(tiny_dirs):
    done = run_cli("demo", "--model", str(tiny_dirs["default"]), "--delay", "0",
                   "--max-tokens", "6")
    assert done.returncode == 0, done.stderr
    assert "step 1" in done.stdout and "forward passes" in done.stdout
