"""Where a model is found: the bundled model, a local directory, or a snapshot in the Hugging
Face cache. Torch-free, so that `diffusion-lsp models` and the command line's early checks
answer at once; `model.network.loader` loads what these find.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.catalog.registry import find_supported

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_GLOB = "*.safetensors"
# config.json's key for the model's calibrated confidence floor (docs/benchmarks.md)
MIN_CONFIDENCE_KEY = "diffusion_lsp_min_confidence"
GET_A_REAL_MODEL = "diffusion-lsp pull Open-dCoder-0.5B"  # the smallest real model
PREVIEW_NOTICE = ("the bundled model is a PREVIEW, trained by this project on a small corpus: "
                  "its suggestions are not useful yet, and most are held back as too unsure "
                  "(completion.minConfidence). For real completions: "
                  f"`{GET_A_REAL_MODEL}`, then `--model Open-dCoder-0.5B` (editors: the "
                  "model.path setting); `diffusion-lsp models` lists the others")


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message names the path and what was expected."""


def bundled_model_path() -> Path | None:
    """The model shipped in the repo, if its files are present."""
    return BUNDLED_DIR if (BUNDLED_DIR / CONFIG_FILE).exists() else None


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """A local directory for `name_or_path`: itself, the HF cache snapshot, or the bundled model."""
    if name_or_path in (None, "", "bundled", "default"):
        bundled = bundled_model_path()
        if bundled is None:
            raise ModelLoadError(
                f"no bundled model at {BUNDLED_DIR} (expected {CONFIG_FILE}, {TOKENIZER_FILE} and "
                f"{WEIGHTS_GLOB}); pass --model PATH to a model directory"
            )
        return bundled
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    supported = find_supported(str(name_or_path))
    repo_id = supported.repo_id if supported else str(name_or_path)
    cached = hf_cache_snapshot(repo_id)
    if cached is not None:
        return cached
    raise ModelLoadError(
        f"model {str(name_or_path)!r} not found: not a directory, and not in the Hugging Face "
        f"cache at {hf_hub_dir()} (downloads are never made at run time; download it first "
        f"with `diffusion-lsp pull {name_or_path}`)"
    )


def hf_hub_dir() -> Path:
    """The Hugging Face hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub` (read when called)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    return home / "hub"


def hf_cache_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot of `repo_id`: the one `refs/main` names, else the last by name."""
    if "/" not in repo_id:
        return None
    repo_dir = (cache_dir or hf_hub_dir()) / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.exists():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo_dir / "snapshots").glob("*")) if repo_dir.exists() else []
    return snapshots[-1] if snapshots else None


def min_confidence(path: Path) -> float:
    """The confidence floor calibrated for the model in `path`: its config.json's
    MIN_CONFIDENCE_KEY, else its row in the supported table (by the cache folder's repo id),
    else 0 (not calibrated: no floor)."""
    try:
        value = json.loads((path / CONFIG_FILE).read_text()).get(MIN_CONFIDENCE_KEY)
    except (OSError, ValueError, AttributeError):
        value = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    for part in path.parts:
        if part.startswith("models--"):
            supported = find_supported(part[len("models--"):].replace("--", "/", 1))
            if supported is not None and supported.min_confidence is not None:
                return supported.min_confidence
    return 0.0


def model_problem(name_or_path: str) -> str | None:
    """Why `name_or_path` cannot be a model, found without loading anything (a missing
    directory or cache entry, a folder with no config.json); None when it may load. A
    benchmark's `random:SHAPE` is not judged here."""
    if name_or_path.startswith("random:"):
        return None
    try:
        path = resolve_model_path(name_or_path)
    except ModelLoadError as error:
        return str(error)
    if not (path / CONFIG_FILE).is_file():
        return (f"{path} is not a model directory (no {CONFIG_FILE}); pass a folder that holds "
                f"{CONFIG_FILE}, {TOKENIZER_FILE} and {WEIGHTS_GLOB}, or a name from "
                "`diffusion-lsp models`")
    return None
