"""What `pip install .` installs: the product's packages only (lsp_server, model, diffusion_lsp,
diffusion_contract), never a generic top-level name such as benchmarks/ or service, which would
shadow or be shadowed by another project's; `bench` and `eval` find benchmarks/ in the source
checkout they run from, or say in one line that they need one. And what the layout promises:
the language server and the contract import no tensors."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_lsp import cli

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = {"lsp_server", "model", "diffusion_lsp", "diffusion_contract"}


def find_config() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["setuptools"]["packages"]["find"]


def test_no_pattern_installs_benchmarks():
    assert not any(fnmatch.fnmatch("benchmarks", p) for p in find_config()["include"])


def test_setuptools_finds_the_products_packages_only():
    setuptools = pytest.importorskip("setuptools")
    find = find_config()
    found = setuptools.find_namespace_packages(where=str(ROOT), include=find["include"],
                                               exclude=find.get("exclude", ()))
    top = {name.split(".")[0] for name in found}
    assert top == INSTALLED, top


def checkout_at(root: Path, benchmarks: bool = True, pyproject: bool = True) -> Path:
    (root / "diffusion_lsp").mkdir(parents=True)
    if benchmarks:
        (root / "benchmarks").mkdir()
        (root / "benchmarks" / "__init__.py").write_text("")
    if pyproject:
        (root / "pyproject.toml").write_text("")
    return root / "diffusion_lsp"


def test_the_checkout_is_the_folder_above_the_package(tmp_path):
    assert cli.source_checkout() == ROOT
    assert cli.source_checkout(checkout_at(tmp_path / "clone")) == tmp_path / "clone"


def test_an_installed_wheel_has_no_checkout(tmp_path):
    assert cli.source_checkout(checkout_at(tmp_path / "site-packages", benchmarks=False,
                                           pyproject=False)) is None
    another_projects = checkout_at(tmp_path / "other" / "site-packages", pyproject=False)
    assert cli.source_checkout(another_projects) is None


def test_bench_puts_the_checkout_first_on_the_path(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    checkout_at(clone)
    monkeypatch.setattr(cli, "source_checkout", lambda: clone)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(clone)])
    assert cli.use_benchmarks()
    assert sys.path[0] == str(clone)


@pytest.mark.parametrize("argv", [["bench", "latency"], ["eval", "humaneval-infilling"]])
def test_bench_and_eval_without_a_checkout_say_so_in_one_line(monkeypatch, capsys, argv):
    monkeypatch.setattr(cli, "source_checkout", lambda: None)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"diffusion-lsp {argv[0]}:") and "source checkout" in err
    assert "git clone" in err


def imported_by(modules: list[str]) -> set[str]:
    """The top-level names in sys.modules after a fresh interpreter imports `modules`."""
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def modules_of(package: str) -> list[str]:
    folder = ROOT / package
    return [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for p in sorted(folder.rglob("*.py"))]


def test_the_language_server_knows_no_tensors():
    """Every module of lsp_server/ (the local backend and the doctor load the model lazily,
    where a model is loaded) and of the torch-free contract imports without torch."""
    loaded = imported_by(modules_of("lsp_server") + modules_of("diffusion_contract"))
    assert "torch" not in loaded and "transformers" not in loaded


def test_the_contract_stands_below_the_model():
    loaded = imported_by(modules_of("diffusion_contract"))
    assert not {"model", "lsp_server", "diffusion_lsp"} & loaded, loaded
