"""8- and 4-bit weights: what `int8` / `int4` mean on each device, applied as the network loads.

Bits are a property of the loaded network: the decoder layers' linear projections get weights
that are tensor subclasses whose `F.linear` runs a library kernel (torchao's, through
`torchao.quantization.quantize_`, or torch's own aten int8 kernel through `Int8RowWeight`).
Everything else -- transformers' modules, the fast step's own layer loop
(model.decoding.fast_step calls `F.linear` on the same weights), the document cache, batches, holes,
next edits -- sees an ordinary module. The LM head, the embedding (tied to the head in the
0.5B models) and the norms keep the network's dtype: the head was not measured to be safe.

What each scheme means per device, chosen from benchmarks/quant_kernels.py (this project's
2-core AVX2 CPU, no native bf16; docs/benchmarks.md has the table):

    device  int8                                   int4
    cpu     aten's _weight_int8pack_mm (int8        torchao PrototypeInt4WeightOnlyConfig
            weights, one scale per output row;      (Int4OpaqueTensor: aten's
            `Int8RowWeight`), bf16 activations      _weight_int4pack_mm_for_cpu), bf16
    cuda    torchao Int8WeightOnlyConfig, bf16      torchao Int4WeightOnlyConfig, tile-packed
                                                    (aten's _weight_int4pack_mm), bf16

On the CPU torchao's own int8 weight-only tensor converts the whole weight to bf16 before a
plain matrix product on every call (1.5x float32's time there, eager); aten's int8 kernel reads
the int8 bytes (0.55x). Both take bf16 activations: their float32 paths ran 1.5-5.6x float32's
time. The LM head stays as loaded: on this CPU a quantized network runs the head in bf16.

A scheme a device has no kernel for (torchao missing, an unknown device) falls back to the
nearest that works (int4 -> int8 -> none), said once (`Plan.notice`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_contract.options import BYTES_PER_WEIGHT, QUANTIZATIONS

NONE, INT8, INT4, AUTO = QUANTIZATIONS
SCHEMES = (NONE, INT8, INT4)
CHOICES = QUANTIZATIONS
INT4_GROUPS = (128, 64, 32)  # int4 scales per group of this many inputs: the first that divides
log = logging.getLogger(__name__)


class QuantizationError(ValueError):
    """A quantization choice that cannot be honoured (unknown name, nothing fits)."""


def check_choice(value: str) -> str:
    """`value` when it names a choice; raises QuantizationError naming the valid ones."""
    if value not in CHOICES:
        raise QuantizationError(f"unknown quantization {value!r}; known: {', '.join(CHOICES)}")
    return value


@dataclass(frozen=True)
class Kernel:
    """How one scheme runs on one kind of device: the torchao config and the dtype the rest
    of the network (and the activations) run in."""

    scheme: str
    device: str  # "cpu" | "cuda"
    config: str  # a torchao config class
    dtype: torch.dtype  # weights are quantized from, and activations run in, this dtype
    description: str

    def make_config(self, in_features: int):  # noqa: ANN201 - a torchao config
        """The torchao config for a linear layer of `in_features` inputs (None: it cannot be
        quantized by this kernel, e.g. no int4 group divides its width)."""
        if self.config == "Int8WeightOnlyConfig":
            from torchao.quantization import Int8WeightOnlyConfig

            return Int8WeightOnlyConfig()
        group = next((g for g in INT4_GROUPS if in_features % g == 0), None)
        if group is None:
            return None
        if self.config == "PrototypeInt4WeightOnlyConfig":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)


ATEN_INT8 = "aten._weight_int8pack_mm"
KERNELS = {
    ("cpu", INT8): Kernel(INT8, "cpu", ATEN_INT8, torch.bfloat16,
                          "aten int8 weight-only (per-row scales), bf16 activations"),
    ("cpu", INT4): Kernel(INT4, "cpu", "PrototypeInt4WeightOnlyConfig", torch.bfloat16,
                          "torchao int4 (aten _weight_int4pack_mm_for_cpu), bf16 activations"),
    ("cuda", INT8): Kernel(INT8, "cuda", "Int8WeightOnlyConfig", torch.bfloat16,
                           "torchao int8 weight-only, bf16 activations"),
    ("cuda", INT4): Kernel(INT4, "cuda", "Int4WeightOnlyConfig", torch.bfloat16,
                           "torchao int4 tile-packed (aten _weight_int4pack_mm), bf16"),
}
FALLBACK = {INT4: INT8, INT8: NONE}


def torchao_version() -> str | None:
    """torchao's version, None where it cannot be imported. Its import-time warnings about
    kernels for other hardware stay out of the log (model/__init__.py)."""
    try:
        import torchao
    except Exception:  # noqa: BLE001 - torchao missing or broken: no kernels
        return None
    return str(torchao.__version__)


def kernel_for(scheme: str, device: torch.device) -> Kernel | None:
    """The kernel `scheme` runs with on `device`; None where it has none here (torchao's
    kernels need torchao; aten's int8 kernel only torch)."""
    kernel = None if scheme == NONE else KERNELS.get((device.type, scheme))
    if kernel is None or (kernel.config != ATEN_INT8 and torchao_version() is None):
        return None
    return kernel


@dataclass(frozen=True)
class Plan:
    """What a load will do: the scheme asked for, the one used, its kernel, and a line to say
    once where they differ (or where `auto` chose)."""

    asked: str
    scheme: str
    kernel: Kernel | None
    notice: str | None = None


def nearest_working(scheme: str, device: torch.device, asked: str | None = None) -> Plan:
    """`scheme` on `device`, or the nearest scheme that has a kernel there (int4 -> int8 ->
    none), with a notice naming what was asked and what runs instead."""
    asked = asked or scheme
    wanted = scheme
    while scheme != NONE and kernel_for(scheme, device) is None:
        scheme = FALLBACK[scheme]
    notice = None
    if scheme != wanted:
        why = ("torchao is not installed: pip install 'diffusion-lsp[quantization]'"
               if torchao_version() is None else "no kernel")
        notice = (f"quantization {wanted} has no kernel on {device.type} ({why}); "
                  f"using {scheme}")
    return Plan(asked, scheme, kernel_for(scheme, device), notice)


# -- auto ------------------------------------------------------------------------------------

CUDA_ROOM = 0.2  # auto on CUDA: weights may take at most this much less than the free memory
# auto on a CPU: unquantized. Measured side by side on the idle 2-core AVX2 VM without native
# bf16 (docs/benchmarks.md, 0.5B shape): int8 and int4 took as long as float32 for a typed
# character (1.00x / 0.97x) and longer for a first request; with native bf16 the bf16 network
# (model.catalog.cpu) was measured and int8 was not. `int8` / `int4` stay a choice (smaller
# weights).
CPU_AUTO = NONE


def weight_bytes(parameters: int, linear_parameters: int, scheme: str,
                 dtype_bytes: float = 2.0) -> int:
    """Bytes the weights take: the linears in `scheme`, the rest in `dtype_bytes` a value."""
    rest = parameters - linear_parameters
    per = dtype_bytes if scheme == NONE else BYTES_PER_WEIGHT[scheme]
    return int(rest * dtype_bytes + linear_parameters * per)


def choose_auto(device: torch.device, parameters: int, linear_parameters: int,
                free_bytes: int | None = None) -> Plan:
    """`auto`: on CUDA the first of none / int8 / int4 whose weights leave CUDA_ROOM of the
    free memory for the document caches (QuantizationError naming what would fit where none
    does); on a CPU CPU_AUTO (none: not faster there yet)."""
    if device.type == "cuda":
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0]
        budget = free_bytes * (1 - CUDA_ROOM)
        for scheme in SCHEMES:
            need = weight_bytes(parameters, linear_parameters, scheme)
            if need <= budget and (scheme == NONE or kernel_for(scheme, device)):
                plan = nearest_working(scheme, device, AUTO)
                return Plan(AUTO, plan.scheme, plan.kernel,
                            f"quantization auto: {scheme}, weights about {gib(need)} of "
                            f"{gib(free_bytes)} free")
        smallest = weight_bytes(parameters, linear_parameters, INT4)
        raise QuantizationError(
            f"the model does not fit on {device}: even in int4 its weights take about "
            f"{gib(smallest)} and {gib(free_bytes)} are free (with room for caches it needs "
            f"about {gib(smallest / (1 - CUDA_ROOM))}); choose a smaller model or the CPU")
    plan = nearest_working(CPU_AUTO, device, AUTO)
    return Plan(AUTO, plan.scheme, plan.kernel, plan.notice)


def gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


# -- applying it -----------------------------------------------------------------------------


def quantizable(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear projections of a decoder layer (or any module): what gets quantized."""
    return [(name, child) for name, child in module.named_modules()
            if isinstance(child, nn.Linear)]


class Int8RowWeight(torch.Tensor):
    """An int8 (N, K) weight with one scale per output row (`scale`, (N,), the activations'
    dtype) whose `F.linear` runs aten's `_weight_int8pack_mm` (torch's CPU kernel: it reads
    the int8 bytes). Any other operation sees the plain int8 tensor."""

    scale: torch.Tensor

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor) -> Int8RowWeight:
        weight = torch.Tensor._make_subclass(cls, qdata)
        weight.scale = scale
        return weight

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor) -> None:
        pass  # made in __new__

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8RowWeight:
        """Symmetric per-row int8 of a float (N, K) weight."""
        wide = weight.detach().float()
        scale = wide.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        qdata = torch.round(wide / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qdata, scale.to(weight.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).to(self.scale.dtype) * self.scale[:, None]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
            y = torch.ops.aten._weight_int8pack_mm(rows, weight.as_subclass(torch.Tensor),
                                                   weight.scale)
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            return y if bias is None else y + bias
        if func is torch.Tensor.detach:
            return cls(args[0].as_subclass(torch.Tensor).detach(), args[0].scale)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def quantize_module(module: nn.Module, kernel: Kernel) -> int:
    """Quantize `module`'s linear layers in place with `kernel` (their weights already in
    `kernel.dtype` on the target device). Returns how many were quantized; a layer no group
    size fits stays as it is."""
    done = 0
    for _, linear in quantizable(module):
        if kernel.config == ATEN_INT8:
            linear.weight = nn.Parameter(Int8RowWeight.quantize(linear.weight),
                                         requires_grad=False)
            done += 1
            continue
        config = kernel.make_config(linear.in_features)
        if config is None:
            continue
        from torchao.quantization import quantize_

        quantize_(linear, config, filter_fn=None)
        done += 1
    return done


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether `weight` is a quantized tensor (a subclass), not plain values."""
    return type(weight) not in (torch.Tensor, nn.Parameter)


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes `tensor` really holds: a quantized weight's packed values and scales (a
    torchao tensor's inner tensors), not its logical numel times its nominal dtype."""
    if isinstance(tensor, Int8RowWeight):
        return tensor.numel() + stored_bytes(tensor.scale)
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def linear_parameter_count(network: nn.Module) -> int:
    """Parameters in the decoder layers' linear projections (what a scheme shrinks)."""
    return sum(linear.weight.numel() for layer in network.model.layers
               for _, linear in quantizable(layer))
