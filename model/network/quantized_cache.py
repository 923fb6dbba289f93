"""Quantized weights kept on disk, so that the second start of a quantized model is fast.

One directory per key under the cache root (`DIFFUSION_LSP_CACHE`, else
`$XDG_CACHE_HOME/diffusion-lsp`, else `~/.cache/diffusion-lsp`, then `quantized/`): the
network's state (quantized tensors included) as `weights.pt` and `manifest.json`, which records
the key and the file's SHA-256. The key hashes the checkpoint's fingerprint (config.json's bytes
and each weight file's name, size and modification time; a hub snapshot's files are named by
their content's hash already), the scheme, its kernel and the versions of torch and torchao. A
copy whose manifest, key or checksum does not match, or that fails to load, is rebuilt from the
checkpoint, never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

CACHE_ENV = "DIFFUSION_LSP_CACHE"
WEIGHTS = "weights.pt"
MANIFEST = "manifest.json"
FORMAT = 1  # bump when what is saved changes
KEPT = 4  # copies kept (the most recently used): a checkpoint that changed leaves its old one
CHUNK = 1 << 24
log = logging.getLogger(__name__)


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "quantized"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "diffusion-lsp" / "quantized"


def checkpoint_fingerprint(path: Path, weight_files: list[Path], config_file: Path) -> str:
    """SHA-256 of config.json's bytes and each weight file's name, size and mtime."""
    digest = hashlib.sha256(config_file.read_bytes())
    for file in sorted(weight_files):
        stat = file.stat()
        target = file.resolve().name  # a hub blob is named by its content's sha256
        digest.update(f"{file.name}\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(fingerprint: str, *parts: object) -> str:
    """The cache's key for a checkpoint and everything that changes its quantized form."""
    from model.network.quantize import torchao_version

    text = json.dumps([FORMAT, fingerprint, torch.__version__, torchao_version(),
                       *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def load_cached(key: str, network: nn.Module, device: torch.device) -> bool:
    """Fill `network` (built on the meta device) from the cached copy for `key`: True when it
    was there and whole; False (after saying why, once in the log) when it must be built."""
    folder = cache_root() / key
    weights, manifest = folder / WEIGHTS, folder / MANIFEST
    if not weights.exists():
        return False
    try:
        recorded = json.loads(manifest.read_text())
        if recorded.get("key") != key or recorded.get("sha256") != file_sha256(weights):
            raise ValueError("checksum or key does not match")
        state = torch.load(weights, map_location=device, weights_only=False, mmap=True)
        network.load_state_dict(state, strict=True, assign=True)
        manifest.touch()  # most recently used: kept by `prune`
    except Exception as error:  # noqa: BLE001 - any damage: rebuild from the checkpoint
        log.warning("quantized weights in %s are unusable (%s); rebuilding them", folder,
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    return True


def save_cached(key: str, network: nn.Module) -> Path | None:
    """Write `network`'s state for `key` (atomically: a half-written copy is never found).
    Returns the folder, or None when it could not be written (said in the log)."""
    folder = cache_root() / key
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / (WEIGHTS + ".partial")
        torch.save(network.state_dict(), partial)
        checksum = file_sha256(partial)
        os.replace(partial, folder / WEIGHTS)
        (folder / MANIFEST).write_text(json.dumps({"key": key, "sha256": checksum}))
    except OSError as error:
        log.warning("could not keep the quantized weights in %s: %s", folder, error)
        return None
    prune(KEPT)
    return folder


def prune(kept: int) -> None:
    """Remove all but the `kept` most recently used copies (a load touches its manifest)."""
    import shutil

    folders = sorted((p for p in cache_root().iterdir() if p.is_dir()),
                     key=lambda p: (p / MANIFEST).stat().st_mtime if (p / MANIFEST).exists()
                     else 0.0, reverse=True)
    for old in folders[kept:]:
        shutil.rmtree(old, ignore_errors=True)
