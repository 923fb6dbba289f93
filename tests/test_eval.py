"""The HumanEval-infilling harness scores right: reference middles pass, wrong ones fail, a
hung program times out and fails, and the model sees the `def` line however long the prompt."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest

import benchmarks.humaneval as humaneval
from benchmarks.sandbox import run_program, run_programs
from lsp_server.context import cut_prefix, cut_suffix
from model.decoding.hole import Infill

DATA = Path(__file__).parent / "data" / "humaneval-infilling"
SPLITS = ("single-line", "multi-line")


def tasks_of(split: str) -> list[dict]:
    tasks, _, _ = humaneval.load_tasks(split, data=DATA)
    return tasks


def words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------------------------
# Executing programs


@pytest.mark.parametrize("split", SPLITS)
def test_reference_solutions_all_pass(split):
    tasks = tasks_of(split)
    programs = [humaneval.program_of(t, humaneval.as_lines(t["canonical_solution"]))
                for t in tasks]
    outcomes = run_programs(programs, timeout_s=10)
    assert [o.status for o in outcomes] == ["passed"] * len(tasks), [o.error for o in outcomes]


def test_wrong_completions_fail():
    task = next(t for t in tasks_of("single-line") if t["entry_point"] == "truncate_number")
    indent = task["canonical_solution"][: len(task["canonical_solution"])
                                          - len(task["canonical_solution"].lstrip())]
    wrong = run_program(humaneval.program_of(task, indent + "return number\n"))
    assert wrong.status == "failed" and "AssertionError" in wrong.error
    broken = run_program(humaneval.program_of(task, indent + "return (number\n"))
    assert broken.status == "failed" and "SyntaxError" in broken.error


def test_infinite_loop_times_out_and_fails():
    task = tasks_of("multi-line")[0]
    hang = "    while True:\n        pass\n"
    outcome = run_program(humaneval.program_of(task, hang), timeout_s=1)
    assert outcome.status == "timeout" and not outcome.passed
    assert outcome.seconds < 5


def test_program_runs_in_a_temporary_directory_not_here():
    here = str(Path.cwd())
    outcome = run_program(f"import os\nassert os.getcwd() != {here!r}\n"
                          "open('left-behind.txt', 'w').write('x')\n")
    assert outcome.passed
    assert not (Path.cwd() / "left-behind.txt").exists()


# ---------------------------------------------------------------------------------------------
# Scoring


class OracleEngine:
    """Stands in for the engine: answers each hole with a scripted completion."""

    answers: dict[str, str] = {}

    def __init__(self, model, max_batch=16, warm_up=False):
        pass

    def submit(self, prefix, suffix, options):
        request = SimpleNamespace(future=Future())
        text = next(a for p, a in self.answers.items() if prefix.endswith(p))
        request.future.set_result(Infill(text, steps=3, tokens=5, finish_reason="end",
                                         timings={"total_ms": 10.0, "forward_ms": 8.0}))
        request.result = lambda timeout=None: request.future.result(timeout)
        return request

    def close(self):
        pass


def test_pass_at_1_and_exact_match_are_counted_right(monkeypatch):
    import model.engine

    tasks = tasks_of("single-line")[:4]
    # the model sees the prompt's end; the last 40 characters pick the task
    answers = {t["prompt"][-40:]: t["canonical_solution"].rstrip("\n") for t in tasks}
    first, second = tasks[0], tasks[1]
    answers[first["prompt"][-40:]] = "    return None"  # wrong: fails, no exact match
    answers[second["prompt"][-40:]] = "    " + second["canonical_solution"].strip() + "  "
    monkeypatch.setattr(OracleEngine, "answers", answers)
    monkeypatch.setattr(model.engine, "Engine", OracleEngine)
    fake_model = SimpleNamespace(tokenizer=SimpleNamespace(
        encode=lambda text, add_special_tokens=False: SimpleNamespace(ids=text.split())))
    records = humaneval.evaluate(fake_model, tasks, options=None, latency_sample=2)
    assert [r["passed"] for r in records] == [False, True, True, True]
    assert [r["exact_match"] for r in records] == [False, True, True, True]
    assert [r["alone"] for r in records] == [True, True, False, False]
    summary = humaneval.summarise(records, records_in_split=len(tasks))
    assert summary["pass_at_1"] == 0.75 and summary["exact_match"] == 0.75
    assert summary["outcomes"] == {"failed": 1, "passed": 3}


def test_single_line_completion_gets_its_newline_back():
    assert humaneval.as_lines("    return x") == "    return x\n"
    assert humaneval.as_lines("    a = 1\n    b = 2\n") == "    a = 1\n    b = 2\n"


# ---------------------------------------------------------------------------------------------
# Data and context


def test_limit_takes_evenly_spaced_records_and_missing_data_says_where_it_looked(tmp_path):
    tasks, total, _ = humaneval.load_tasks("single-line", limit=3, data=DATA)
    assert total == 6 and [t["task_id"] for t in tasks] == [
        t["task_id"] for t in tasks_of("single-line")[::2]]
    with pytest.raises(humaneval.EvalDataError, match="--data"):
        humaneval.load_tasks("single-line", data=tmp_path)


def test_cut_prefix_keeps_signature_and_docstring_ends():
    body = "".join(f"    x{i} = {i}  # filler line number {i}\n" for i in range(40))
    prompt = ("import math\n\n\ndef area(\n    radius: float,\n) -> float:\n"
              '    """Area of a circle.\n\n' + "    More words here.\n" * 30 + '    """\n'
              + body)
    cut = cut_prefix(prompt, 60, words)
    assert "def area(\n    radius: float,\n) -> float:\n" in cut
    assert '    """Area of a circle.\n' in cut
    assert cut.count('"""') == 2  # the docstring is still closed
    assert cut.endswith("    x39 = 39  # filler line number 39\n")
    assert words(cut) <= 60
    assert "import math" not in cut  # far from the hole, and over budget
    assert cut_prefix(prompt, 10_000, words) == prompt


def test_cut_prefix_keeps_every_humaneval_def_line():
    for split in SPLITS:
        for task in tasks_of(split):
            cut = cut_prefix(task["prompt"], 20, words)
            assert f"def {task['entry_point']}(" in cut
            assert cut.endswith(task["prompt"].split("\n")[-1])


def test_cut_suffix_keeps_whole_lines_from_the_start():
    suffix = " + 1\n" + "".join(f"line {i}\n" for i in range(50))
    cut = cut_suffix(suffix, 10, words)
    assert cut.startswith(" + 1\nline 0\n") and words(cut) <= 10 and cut.endswith("\n")


# ---------------------------------------------------------------------------------------------
# The command


def test_eval_command_writes_json_and_plot(tiny_dirs, tmp_path, capsys):
    output = tmp_path / "eval.json"
    args = SimpleNamespace(benchmark="humaneval-infilling", split="multi-line", limit=2,
                           data=str(DATA), output=str(output), max_tokens=6,
                           model=str(tiny_dirs["default"]), family=None, device="cpu",
                           dtype="auto")
    assert humaneval.run_eval(args) == 0
    payload = json.loads(output.read_text())
    summary = payload["summary"]
    assert summary["tasks"] == 2 and summary["records_in_split"] == 3
    assert 0 <= summary["pass_at_1"] <= 1 and summary["latency_p50_ms"] > 0
    assert {r["outcome"] for r in payload["records"]} <= {"passed", "failed", "timeout"}
    assert payload["machine"]["cpu"] and payload["model_sha256"]
    assert output.with_suffix(".png").exists()
    assert "pass@1" in capsys.readouterr().out


def test_eval_command_without_data_fails_clearly(tmp_path, capsys):
    args = SimpleNamespace(benchmark="humaneval-infilling", split="single-line", limit=None,
                           data=str(tmp_path), output=None, max_tokens=None, model=None,
                           family=None, device="cpu", dtype="auto")
    assert humaneval.run_eval(args) == 1
    assert "not found" in capsys.readouterr().err
