"""What runs fastest on this CPU: the dtype `auto` picks, by a rule measured on real machines.

Measured on the project's 2-core AMD EPYC VM (AVX-512 with bf16 dot products, no AMX), torch
2.13, a random-weight model of Qwen2.5-0.5B's shape (Open-dCoder-0.5B), idle machine (load
0.2), median of 3, the passes `diffusion-lsp bench cpu --shape qwen2.5-0.5b` times (its rerun
on the loaded machine is in benchmarks/results/cpu-profile-qwen2.5-0.5b.json):

    pass                         float32    bfloat16
    320 tokens, whole sequence   1742 ms    1002 ms
    16-token hole vs cached ctx   307 ms      88 ms
    lm_head over 16 rows          119 ms      15 ms

bfloat16 halves the bytes every pass reads and the CPU multiplies it natively (oneDNN's
AVX512_BF16 / AMX kernels). Without those instructions bfloat16 is emulated and loses to
float32, and a model of a few million parameters is bound by per-op overhead, not by bytes,
so keeps float32 (which also keeps its output bit-for-bit as trained and tested). The rule:

    dtype auto on a CPU = bfloat16 when the CPU has native bf16 dot products (x86 flags
    avx512_bf16 or amx_bf16; aarch64 flag bf16) and the model has at least
    BF16_MIN_PARAMETERS parameters; float32 otherwise.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# CPU flags (as /proc/cpuinfo names them) that mean bf16 matrix products run natively
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# below this many parameters a forward pass is bound by per-op overhead: float32 costs nothing
BF16_MIN_PARAMETERS = 100_000_000


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of this machine's CPU (empty where /proc/cpuinfo does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | aarch64
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where bf16 matrix products run natively (see NATIVE_BF16_FLAGS); Apple silicon
    (no /proc/cpuinfo) is treated as not having them."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & NATIVE_BF16_FLAGS)


def auto_cpu_dtype(parameters: int, flags: frozenset[str] | None = None) -> torch.dtype:
    """The dtype `auto` means on a CPU, for a model with `parameters` parameters (the rule in
    this module's docstring)."""
    if parameters >= BF16_MIN_PARAMETERS and has_native_bf16(flags):
        return torch.bfloat16
    return torch.float32


def describe() -> dict:
    """What the dtype rule and the thread count are based on, for benchmark headers."""
    flags = cpu_flags()
    return {"machine": platform.machine(), "native_bf16": has_native_bf16(flags),
            "amx": "amx_tile" in flags, "threads": torch.get_num_threads()}
