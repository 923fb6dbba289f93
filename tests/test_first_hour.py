"""A user's first hour with the command line: it says what it is, what every option does, and
what is wrong, at once, in the terminal."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_lsp.cli import build_parser
from model.catalog.registry import SUPPORTED_MODELS

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusion_lsp", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env, cwd=cwd,
                          stdin=subprocess.PIPE)  # stdin open, as an editor leaves it


def test_version():
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("diffusion-lsp 0.")


def every_option():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):  # options and positionals
                yield name, action


def test_every_option_says_what_it_does_and_its_default():
    missing, no_default = [], []
    for command, action in every_option():
        flag = f"{command} {'/'.join(action.option_strings) or action.dest}"
        if not action.help:
            missing.append(flag)
        elif (action.option_strings and action.default not in (None, False)
              and "default" not in action.help):
            no_default.append(flag)
    assert missing == [] and no_default == []


@pytest.mark.parametrize("model", ["does-not-exist", "/tmp"])
def test_serve_with_a_model_that_cannot_load_says_so_on_stderr_and_exits(model, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    done = run_cli("serve", "--model", model, env=env, timeout=60)
    assert done.returncode == 2
    assert ("not found" in done.stderr) if model == "does-not-exist" else (
        "not a model directory" in done.stderr)
    assert done.stdout == ""  # nothing an LSP client would take for a message


def test_models_lists_the_bundled_model_and_every_repo_id_whole_quickly(tmp_path):
    env = {**os.environ, "COLUMNS": "60", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    done = run_cli("models", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for model in SUPPORTED_MODELS:
        assert any(model.repo_id in line for line in lines), model.repo_id
    assert any(line.strip("│ ").startswith("bundled") for line in lines)
    assert "PREVIEW" in done.stdout
    # the table needs no model code: torch is never imported (it took seconds)
    code = ("import sys; from diffusion_lsp.cli import main; main(['models', '--json']); "
            "sys.stderr.write(str('torch' in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=60, check=False)
    assert probe.stderr.strip().endswith("False"), probe.stderr


def test_eval_and_bench_say_where_to_get_their_data(tmp_path):
    for args in (("eval", "humaneval-infilling"), ("bench", "typing")):
        done = run_cli(*args, "--data", str(tmp_path), "--limit", "1")
        assert done.returncode == 1, done.stderr[-2000:]
        assert "github.com/openai/human-eval-infilling" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr


def fake_venv(root: Path) -> Path:
    """A .venv whose python records its calls and whose diffusion-lsp echoes its arguments."""
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = root / "calls"
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "python $*" >> {calls}\n')
    (venv / "bin" / "diffusion-lsp").write_text('#!/bin/sh\necho "ran $*"\n')
    for tool in ("python", "diffusion-lsp"):
        (venv / "bin" / tool).chmod(0o755)
    calls.write_text("")
    return venv


def test_run_sh_does_not_set_up_again_when_the_venv_is_up_to_date(tmp_path):
    venv = fake_venv(tmp_path)
    env = {**os.environ, "VENV": str(venv)}
    stamp = subprocess.run(  # what setup.sh writes after a successful install
        ["bash", "-c", "sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    (venv / ".diffusion-lsp-setup").write_text(f"{stamp} \n")
    done = subprocess.run(["bash", "scripts/run.sh", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ran --version", done.stderr
    assert (tmp_path / "calls").read_text() == "" and done.stderr == ""
    (venv / ".diffusion-lsp-setup").write_text("0000 \n")  # pyproject.toml changed since
    subprocess.run(["bash", "scripts/run.sh", "--version"], cwd=ROOT, env=env,
                   capture_output=True, text=True, timeout=60, check=False)
    assert "pip install" in (tmp_path / "calls").read_text()
