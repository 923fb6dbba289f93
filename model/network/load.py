"""The model a command runs: the one named with --model, else the bundled one, else (with a
warning) a tiny random-weight stand-in, so that every command can still be tried.

The command line, the service and the benchmarks all start from here.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from model.network.families import parse_overrides
from model.network.loader import LoadedModel, bundled_model_path, load_model

TINY_FALLBACK_DIR = Path(tempfile.gettempdir()) / "diffusion-lsp-tiny-random"
NOISE_WARNING = ("warning: no bundled model is installed; using a tiny RANDOM-weight model "
                 "whose output is noise (pass --model PATH for real completions)")


def tiny_fallback() -> Path:
    """The tiny random-weight model's directory (written on first use), after a warning on
    stderr that its output is noise."""
    from model.network.tiny import write_tiny_model

    print(NOISE_WARNING, file=sys.stderr)
    if not (TINY_FALLBACK_DIR / "model.safetensors").exists():
        write_tiny_model(TINY_FALLBACK_DIR)
    return TINY_FALLBACK_DIR


def load_for_cli(args) -> LoadedModel:
    """The model named by parsed command-line `args` (`model`, `family`, `family_override`,
    `device`, `dtype`, `quantization`); the bundled one by default, the tiny stand-in without
    one."""
    quantization = getattr(args, "quantization", "auto")
    if args.model is None and bundled_model_path() is None:
        return load_model(tiny_fallback(), device=args.device, dtype=args.dtype,
                          quantization=quantization)
    overrides = parse_overrides(getattr(args, "family_override", None))
    return load_model(args.model, family=args.family, device=args.device, dtype=args.dtype,
                      overrides=overrides, quantization=quantization)
