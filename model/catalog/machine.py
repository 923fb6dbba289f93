"""What this machine can run: Python, the torch build, GPUs and their memory, bf16 on the CPU,
and which model to run here with what latency to expect (from `registry.MEASURED`, the
project's own measurements).

Facts only; `lsp_server/doctor.py` adds what is on disk and the remote, and words for people.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field

from diffusion_contract.options import CUDA_ROOM
from model.catalog.registry import MEASURED, Measured, find_supported

GIB = 1024**3
# what a model needs, in GiB of accelerator memory or RAM (bf16 weights plus activations;
# model/catalog/registry.py has the hardware column these come from)
GPU_GIB_FOR_7B = 20.0  # Dream's README: "a GPU with at least 20GB memory"
GPU_GIB_FOR_0_5B = 4.0
RAM_GIB_FOR_0_5B = 4.0


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float


@dataclass(frozen=True)
class Machine:
    python: str
    system: str  # "Linux x86_64"
    cpu_cores: int
    memory_gib: float | None  # RAM; None where it cannot be read
    torch: str  # torch.__version__
    torch_build: str  # "cpu", "cuda 12.4", "rocm 6.2"
    cuda_available: bool
    gpus: tuple[Gpu, ...] = ()
    cpu_native_bf16: bool = False  # bf16 matrix products in hardware (model/catalog/cpu.py)
    cpu_flags_bf16: tuple[str, ...] = field(default=())  # which flags said so

    @property
    def device(self) -> str:
        """What `--device auto` picks here."""
        return "cuda" if self.cuda_available and self.gpus else "cpu"

    @property
    def gpu_memory_gib(self) -> float:
        """The largest GPU's memory (0 without one)."""
        return max((gpu.memory_gib for gpu in self.gpus), default=0.0)


def memory_gib() -> float | None:
    """Total RAM, from sysconf (Linux, macOS); None where it is not available."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (AttributeError, OSError, ValueError):
        return None


def inspect_machine() -> Machine:
    """This machine, as torch sees it (imports torch: seconds)."""
    import torch

    from model.catalog.cpu import NATIVE_BF16_FLAGS, cpu_flags

    cuda = getattr(torch.version, "cuda", None)
    hip = getattr(torch.version, "hip", None)
    build = f"cuda {cuda}" if cuda else f"rocm {hip}" if hip else "cpu"
    available = torch.cuda.is_available()
    gpus: tuple[Gpu, ...] = ()
    if available:
        gpus = tuple(Gpu(props.name, round(props.total_memory / GIB, 1))
                     for props in (torch.cuda.get_device_properties(index)
                                   for index in range(torch.cuda.device_count())))
    flags = cpu_flags()
    return Machine(
        python=platform.python_version() + f" ({sys.executable})",
        system=f"{platform.system()} {platform.machine()}",
        cpu_cores=os.cpu_count() or 1,
        memory_gib=None if (ram := memory_gib()) is None else round(ram, 1),
        torch=torch.__version__, torch_build=build, cuda_available=available, gpus=gpus,
        cpu_native_bf16=bool(flags & NATIVE_BF16_FLAGS),
        cpu_flags_bf16=tuple(sorted(flags & NATIVE_BF16_FLAGS)))


@dataclass(frozen=True)
class Recommendation:
    model: str  # a short name from registry.SUPPORTED_MODELS, or "bundled"
    why: str
    expect: str  # the latency to expect, in words, or that it was not measured
    measured: Measured | None  # the measurement `expect` comes from: where, how to rerun
    command: str  # how to run it


def _measured(model: str, hardware: str) -> Measured | None:
    return next((m for m in MEASURED if m.model == model and m.hardware == hardware), None)


def _expect(measured: Measured | None, scale: str = "") -> str:
    if measured is None:
        return "not measured yet on such a machine (docs/benchmarks.md)"
    return measured.figure + scale


def fits(gpu_gib: float, model: str, scheme: str) -> bool:
    """Whether `model`'s weights in `scheme` leave CUDA_ROOM of a `gpu_gib` GPU free (what
    `--quantization auto` asks on CUDA: model.network.quantize.choose_auto)."""
    size = find_supported(model).size_gb_in(scheme) * 1e9 / GIB
    return size <= gpu_gib * (1 - CUDA_ROOM)


BIG_CODER = "DiffuCoder-7B-cpGRPO"  # the 7B recommended where one fits
BLOCK_CODER = "Stable-DiffCoder-8B-Base"  # named beside it where it fits too


def recommend(machine: Machine) -> Recommendation:
    """Which model to run on `machine`, and what latency to expect, from `MEASURED`."""
    gpu = machine.gpu_memory_gib
    for scheme in ("int8", "int4"):  # a 7B in bf16 does not fit: in 8 or 4 bits?
        if gpu < GPU_GIB_FOR_7B and fits(gpu, BIG_CODER, scheme):
            size = find_supported(BIG_CODER).size_gb_in(scheme)
            return Recommendation(
                BIG_CODER,
                f"a GPU with {gpu:.0f} GiB holds a 7B model in {scheme} (about {size:.1f} GB "
                f"of weights; bf16 needs {GPU_GIB_FOR_7B:.0f} GiB); `--quantization auto` "
                f"picks {scheme} there (its agreement with bf16 on these weights is not "
                "measured here; `--quantization none` needs the larger card)"
                + (f"; Stable-DiffCoder-8B-Base fits too in {scheme} (block diffusion, exact "
                   "cache; unmeasured here)" if fits(gpu, BLOCK_CODER, scheme) else ""),
                _expect(None), None,
                f"diffusion-lsp pull {BIG_CODER} && "
                f"diffusion-lsp serve --model {BIG_CODER} --quantization {scheme}")
    if machine.gpu_memory_gib >= GPU_GIB_FOR_7B:
        return Recommendation(
            "DiffuCoder-7B-cpGRPO",
            f"a GPU with {machine.gpu_memory_gib:.0f} GiB holds a 7B model in bf16 "
            "(Dream-Coder-v0-Instruct-7B and LLaDA-8B fit too, and so does "
            "Stable-DiffCoder-8B-Base: block diffusion, its cache across keystrokes exact, "
            "its speed and infilling not measured here yet)",
            _expect(measured := _measured("DiffuCoder-7B-cpGRPO", "gpu")), measured,
            "diffusion-lsp pull DiffuCoder-7B-cpGRPO && "
            "diffusion-lsp serve --model DiffuCoder-7B-cpGRPO")
    pull_small = ("diffusion-lsp pull Open-dCoder-0.5B && "
                  "diffusion-lsp serve --model Open-dCoder-0.5B")
    if machine.gpu_memory_gib >= GPU_GIB_FOR_0_5B:
        measured = _measured("Open-dCoder-0.5B", "gpu")
        return Recommendation(
            "Open-dCoder-0.5B", f"a GPU with {machine.gpu_memory_gib:.0f} GiB: too small for a "
            f"7B model in bf16 (needs {GPU_GIB_FOR_7B:.0f} GiB)", _expect(measured), measured,
            pull_small)
    if machine.memory_gib is None or machine.memory_gib >= RAM_GIB_FOR_0_5B:
        if machine.cpu_native_bf16:
            measured = _measured("Open-dCoder-0.5B", "cpu-bf16")
            why = ("no usable GPU; this CPU multiplies bf16 natively "
                   f"({', '.join(machine.cpu_flags_bf16)}), so the 0.5B model runs in bf16")
        else:
            measured = _measured("Open-dCoder-0.5B", "cpu")
            why = ("no usable GPU, and this CPU has no native bf16: the 0.5B model runs with "
                   "8-bit weights (`--quantization auto`: int8 on x86; float32 elsewhere)")
        return Recommendation("Open-dCoder-0.5B", why, _expect(measured), measured,
                              pull_small)
    measured = _measured("bundled", "cpu")
    return Recommendation(
        "bundled", f"{machine.memory_gib:.1f} GiB of RAM is too little for a 0.5B model; "
        "the bundled preview model runs anywhere (its completions are not useful yet)",
        _expect(measured), measured, "diffusion-lsp serve")
