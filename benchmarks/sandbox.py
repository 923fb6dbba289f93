"""Run model-written programs safely enough for a benchmark: never in the calling process.

Each program runs in its own `python -I` subprocess (isolated mode: no user site, no PYTHON*
variables, the script's folder not on sys.path), in a fresh temporary directory as its
working directory, with a wall-clock time limit, a memory limit, a file-size limit and a
minimal environment; on timeout its whole process group is killed. This is the sandboxing of
the HumanEval harness (Chen et al., 2021), not a security boundary: run untrusted
benchmarks on a machine you can afford to lose, without network access where possible.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_WORKERS = 2
MEMORY_LIMIT_BYTES = 2 << 30  # address space of the program
FILE_LIMIT_BYTES = 16 << 20  # largest file the program may write (its stderr included)
ERROR_CHARS = 300  # of the last stderr line, kept in the outcome
PROGRAM_FILE = "program.py"
STDERR_FILE = "stderr.txt"

# Sets the limits, then runs the program as __main__ (so that tracebacks name its lines).
BOOTSTRAP = f"""
import runpy, sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT_BYTES}, {MEMORY_LIMIT_BYTES}))
    resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_LIMIT_BYTES}, {FILE_LIMIT_BYTES}))
except (ImportError, ValueError, OSError):
    pass
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Outcome:
    """How one program ended: passed (exit status 0), failed (an error), or timeout."""

    status: str  # passed | failed | timeout
    error: str  # the last line of stderr (the exception), or "" when it passed
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:ERROR_CHARS] if lines else ""


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        process.kill()


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Outcome:
    """Run `program` in a sandboxed subprocess; it passes when it exits with status 0."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffusion-lsp-eval-") as folder:
        work = Path(folder)
        (work / PROGRAM_FILE).write_text(program, encoding="utf-8")
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder,
               "OMP_NUM_THREADS": "1"}
        with (work / STDERR_FILE).open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOTSTRAP, PROGRAM_FILE], cwd=work, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True)
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.wait()
                return Outcome("timeout", f"timed out after {timeout_s:g} s",
                               time.perf_counter() - began)
        seconds = time.perf_counter() - began
        if code == 0:
            return Outcome("passed", "", seconds)
        error = _last_line((work / STDERR_FILE).read_text(encoding="utf-8", errors="replace"))
        return Outcome("failed", error or f"exit status {code}", seconds)


def run_programs(programs: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S,
                 workers: int = DEFAULT_WORKERS,
                 on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Run many programs, `workers` at a time; outcomes in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_program, program, timeout_s) for program in programs]
        outcomes = []
        for index, future in enumerate(futures):
            outcomes.append(future.result())
            if on_done is not None:
                on_done(index, outcomes[-1])
    return outcomes
