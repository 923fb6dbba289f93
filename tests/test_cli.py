"""The `infill` and `demo` commands, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


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


def test_import_time_warnings_of_the_libraries_stay_quiet():
    """torchao (where installed: the quantization extra) warns on import about its CUDA-only
    extensions, and torch about torchao's enums, at every start of every command."""
    pytest.importorskip("torchao")
    code = "from diffusion_lsp.cli import quiet_imports; quiet_imports(); import torchao"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr


@pytest.mark.parametrize("given, kept", [
    ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    ({"GOMP_SPINCOUNT": "300000"}, {"GOMP_SPINCOUNT": "300000", "OMP_WAIT_POLICY": None}),
])
def test_every_command_runs_torch_with_passive_openmp_waits_unless_the_user_chose(given, kept):
    """OpenMP threads that spin while they wait cost a loaded machine twice the latency
    (docs/benchmarks.md): a command's process sets passive waits before torch (so libgomp,
    which reads them once) is loaded; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT stays."""
    import os

    code = ("import json, os, sys\nfrom diffusion_lsp import cli\n"
            "cli.run_doctor = lambda args: print(json.dumps({'loaded': 'torch' in sys.modules, "
            "'env': {k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}}))\n"
            "cli.main(['doctor'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, env={**env, **given})
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not seen["loaded"]  # torch comes later: libgomp reads the setting when it loads
    assert {k: seen["env"][k] for k in kept} == kept


def test_infill_several_holes_jointly_with_previews(tiny_dirs, tmp_path):
    text = "def add(a, b):\n    ...\n\ndef sub(a, b):\n    ...\n"
    first, second = text.index("..."), text.rindex("...")
    records = [
        json.dumps({"id": "two", "text": text,
                    "holes": [[first, first + 3], [second, second + 3]]}),
        json.dumps({"id": "backwards", "text": text, "holes": [[second, second + 3],
                                                              [first, first + 3]]}),
        json.dumps({"id": "none", "text": text, "holes": []}),
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(records) + "\n")
    done = run_cli("infill", "--input", str(source), "--output", str(target), "--previews",
                   "--model", str(tiny_dirs["default"]), "--max-tokens", "6", "--device", "cpu",
                   "--tokens-per-step", "1")
    assert done.returncode == 0, done.stderr
    two, backwards, none = (json.loads(line) for line in target.read_text().splitlines())
    assert "error" in backwards and "error" in none
    assert len(two["completions"]) == 2 and two["steps"] >= 1
    a, b = two["completions"]
    assert two["text"] == text[:first] + a + text[first + 3:second] + b + text[second + 3:]
    assert [p["step"] for p in two["previews"]] == list(range(1, two["steps"]))
    assert all(len(p["holes"]) == 2 for p in two["previews"])
    assert "\u2591" in "".join(two["previews"][0]["holes"])  # one token a step: masks remain


def test_infill_missing_model_is_one_clear_error(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prefix": "x", "suffix": ""}\n')
    done = run_cli("infill", "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                   "--model", str(tmp_path / "no-such-model"))
    assert done.returncode == 1
    assert "no-such-model" in done.stderr and "Traceback" not in done.stderr


def test_bench_with_an_unknown_shape_or_missing_model_is_one_clear_error(tmp_path):
    import gzip

    copy = Path(__file__).parent / "data" / "humaneval-infilling"  # gzipped as bench reads it
    for name in ("HumanEval-SingleLineInfilling.jsonl", "HumanEval-MultiLineInfilling.jsonl"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((copy / name).read_bytes()))
    data = ("--data", str(tmp_path))
    shape = run_cli("bench", "typing", "--shape", "no-such-shape", *data)
    assert shape.returncode == 1, shape.stderr
    assert "unknown shape 'no-such-shape'" in shape.stderr and "Traceback" not in shape.stderr
    model = run_cli("bench", "latency", "--model", str(tmp_path / "no-such-model"),
                    "--limit", "1", *data)
    assert model.returncode in (1, 2), model.stderr
    assert "no-such-model" in model.stderr and "Traceback" not in model.stderr


def test_demo_shows_the_denoising(tiny_dirs):
    done = run_cli("demo", "--model", str(tiny_dirs["default"]), "--delay", "0",
                   "--max-tokens", "6")
    assert done.returncode == 0, done.stderr
    assert "step 1" in done.stdout and "forward passes" in done.stdout


def test_infill_family_overrides_from_the_command_line(tiny_dirs, tmp_path):
    """A checkpoint whose mask token is not the family's runs with --family-override alone;
    an unknown key is one clear error naming the known ones."""
    import shutil

    checkpoint = tmp_path / "renamed-mask"
    shutil.copytree(tiny_dirs["dream"], checkpoint)
    tokenizer = (checkpoint / "tokenizer.json").read_text().replace("<|mask|>", "<M>")
    (checkpoint / "tokenizer.json").write_text(tokenizer)
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": 1, "prefix": "x = ", "suffix": "\n"}) + "\n")
    common = ("infill", "--input", str(source), "--output", str(target), "--model",
              str(checkpoint), "--max-tokens", "4", "--device", "cpu")
    refused = run_cli(*common)
    assert refused.returncode == 1 and "'<|mask|>'" in refused.stderr
    done = run_cli(*common, "--family", "dream", "--family-override", "mask_token=<M>")
    assert done.returncode == 0, done.stderr
    assert "completion" in json.loads(target.read_text())
    bad = run_cli(*common, "--family-override", "mask=<M>")
    assert bad.returncode == 1 and "known: mask_token" in bad.stderr


def test_infill_takes_a_model_cards_sampler_settings(tiny_dirs, tiny_models, tmp_path):
    from diffusion_contract.options import InfillOptions
    from model.decoding.sampler import infill

    prefix, suffix = "def f(x):\n    return ", "\n"
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": 1, "prefix": prefix, "suffix": suffix}) + "\n")
    done = run_cli("infill", "--input", str(source), "--output", str(target),
                   "--model", str(tiny_dirs["llada"]), "--device", "cpu", "--max-tokens", "8",
                   "--algorithm", "low_confidence", "--steps", "4", "--block-length", "4",
                   "--temperature", "0.5", "--seed", "3", "--cfg-scale", "0.5", "--exact")
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in target.read_text().splitlines()]
    expected = infill(tiny_models["llada"], prefix, suffix, InfillOptions(
        max_tokens=8, algorithm="low_confidence", steps=4, block_length=4, temperature=0.5,
        seed=3, cfg_scale=0.5, exact=True))
    assert (record["completion"], record["steps"]) == (expected.text, expected.steps)


def test_infill_refuses_an_unknown_algorithm_with_the_known_ones(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "prefix": "x", "suffix": ""}\n')
    done = run_cli("infill", "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                   "--algorithm", "greedy")
    assert done.returncode == 2
    assert "maskgit_plus" in done.stderr and "Traceback" not in done.stderr


def infill_args(tiny_dirs, source, target, *extra: str) -> list[str]:
    return ["infill", "--input", str(source), "--output", str(target), "--model",
            str(tiny_dirs["default"]), "--max-tokens", "8", "--device", "cpu", *extra]


def test_infill_a_non_utf8_line_loses_that_record_only(tiny_dirs, tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = json.dumps({"id": "ok", "prefix": "x = ", "suffix": "\n"}).encode()
    bad = b'{"id": "latin1", "prefix": "caf\xe9 = ", "suffix": ""}'
    source.write_bytes(b"\n".join([good, bad, good.replace(b'"ok"', b'"ok2"')]) + b"\n")
    done = run_cli(*infill_args(tiny_dirs, source, target))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    out = [json.loads(line) for line in target.read_text().split("\n") if line]
    assert [r["id"] for r in out] == ["ok", "latin1", "ok2"]
    assert "not UTF-8 (byte 0xe9" in out[1]["error"] and out[1]["error"].startswith("line 2")
    assert "completion" in out[0] and "completion" in out[2]


def test_infill_line_separator_lookalikes_stay_inside_their_record(tiny_dirs, tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prefix = "s = 'a\u2028b\u0085c\u2029d\x1c'\nt = "
    line = json.dumps({"id": "seps", "prefix": prefix, "suffix": "\n"}, ensure_ascii=False)
    assert "\u2028" in line  # raw in the input, as editors and other tools write it
    source.write_text(line + "\n", encoding="utf-8")
    done = run_cli(*infill_args(tiny_dirs, source, target))
    assert done.returncode == 0, done.stderr
    written = target.read_text(encoding="utf-8")
    assert written.count("\n") == 1 and len(written.splitlines()) == 1  # any reader: one line
    (record,) = [json.loads(written)]
    assert record["id"] == "seps" and "error" not in record


def test_infill_cuts_a_huge_prefix_to_the_servers_budget(tiny_dirs, tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prefix = "".join(f"value_{index} = {index} * 2\n" for index in range(5000)) + "total = "
    source.write_text(json.dumps({"id": "huge", "prefix": prefix, "suffix": "\n"}) + "\n")
    done = run_cli(*infill_args(tiny_dirs, source, target), timeout=60)
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in target.read_text().splitlines()]
    assert record["context_tokens"] <= 640 + 192  # the server's default budgets
    assert record["latency_ms"] < 30_000  # uncut: ~60,000 tokens a step (first call: warm-up)
    done = run_cli(*infill_args(tiny_dirs, source, target, "--prefix-tokens", "64"))
    (small,) = [json.loads(line) for line in target.read_text().splitlines()]
    assert small["context_tokens"] <= 64 + 192 < record["context_tokens"]


def test_infill_stops_cleanly_on_ctrl_c(tiny_dirs, tmp_path):
    import signal
    import time

    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    hole = {"prefix": "def f(x):\n    return ", "suffix": "\n"}
    source.write_text("".join(json.dumps({"id": i, **hole}) + "\n" for i in range(5000)))
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusion_lsp", *infill_args(tiny_dirs, source, target)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
            not target.exists() or target.read_text().count("\n") < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    lines = target.read_text().split("\n")
    assert lines[-1] == "" and 3 <= len(lines) - 1 < 5000  # whole records only, flushed
    assert [json.loads(line)["id"] for line in lines[:-1]] == list(range(len(lines) - 1))
