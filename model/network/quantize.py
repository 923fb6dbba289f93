"""8- and 4-bit weights: what `int8` / `int4` mean on each device, applied as the network loads.

Bits are a property of the loaded network: the decoder layers' linear projections get weights
that are tensor subclasses whose `F.linear` runs a library kernel (torchao's, through
`torchao.quantization.quantize_`, or torch's own int8 kernels through `Int8RowWeight` /
`Int8DynamicWeight`). Everything else -- transformers' modules, the fast step's own layer loop
(model.decoding.fast_step calls `F.linear` on the same weights), the document cache, batches, holes,
next edits -- sees an ordinary module. Where a kernel says so (`Kernel.head`) the LM head is
quantized too, untied from the embedding, which keeps its values (a lookup reads rows, not a
matrix product); the norms keep the network's dtype.

What each scheme means per device, chosen from benchmarks/quant_kernels.py and `bench
quantization` (this project's 2-core AVX2 CPU, no native bf16; docs/benchmarks.md has the
tables):

    device  int8                                   int4
    cpu     fbgemm's dynamic int8 linear           torchao PrototypeInt4WeightOnlyConfig
            (`quantized::linear_dynamic`, torch's  (Int4OpaqueTensor: aten's
            own x86 kernel; `Int8DynamicWeight`):  _weight_int4pack_mm_for_cpu), bf16
            int8 weights, activations quantized
            per call, float32 around it; the LM
            head too. Where torch's quantized
            engine is not fbgemm (ARM): aten's
            _weight_int8pack_mm, bf16 activations
    cuda    torchao Int8WeightOnlyConfig, bf16      torchao Int4WeightOnlyConfig, tile-packed
                                                    (aten's _weight_int4pack_mm), bf16

On the CPU torchao's own int8 weight-only tensor converts the whole weight to bf16 before a
plain matrix product on every call (1.5x float32's time there, eager), and aten's int8
weight-only kernel, which reads the int8 bytes, still multiplies in bf16, which a CPU without
native bf16 emulates: a typed character took as long as float32 (1.00x). fbgemm multiplies
int8 by int8 with integer instructions every x86 CPU has, so it runs in a fraction of float32's
time; it quantizes activations too (about twice the error of weight-only int8 per layer),
which is why its agreement with the unquantized model is measured (docs/models.md).

No CPU int4 kernel measured on that CPU was faster than fbgemm's int8 (aten's int4pack with
float32 or float16 activations, `_dyn_quant_matmul_4bit`, torchao's Intx int4 configs, OpenVINO
per projection: benchmarks/quant_kernels.py), so there `int4` saves memory, not time: `auto`
never picks it on a CPU and choosing it says so (`INT4_CPU_NOTICE`).

A scheme a device has no kernel for (torchao missing, an unknown device) falls back to the
nearest that works (int4 -> int8 -> none), said once (`Plan.notice`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_contract.options import CUDA_ROOM, QUANTIZATIONS

NONE, INT8, INT4, AUTO = QUANTIZATIONS
SCHEMES = (NONE, INT8, INT4)
CHOICES = QUANTIZATIONS
INT4_GROUPS = (128, 64, 32)  # int4 scales per group of this many inputs: the first that divides
QUANTIZE_BLOCK = 1 << 22  # float values quantized at a time (16 MiB of float32 temporaries)
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
    head: bool = False  # the LM head is quantized too (untied from the embedding)

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
FBGEMM_INT8 = "quantized.linear_dynamic"
OWN_KERNELS = (ATEN_INT8, FBGEMM_INT8)  # torch's own: no torchao needed
KERNELS = {
    ("cpu", INT8): Kernel(INT8, "cpu", FBGEMM_INT8, torch.float32,
                          "fbgemm dynamic int8 (int8 weights per row, activations quantized "
                          "per call, int32 sums), LM head too", head=True),
    ("cpu", INT4): Kernel(INT4, "cpu", "PrototypeInt4WeightOnlyConfig", torch.bfloat16,
                          "torchao int4 (aten _weight_int4pack_mm_for_cpu), bf16 activations"),
    ("cuda", INT8): Kernel(INT8, "cuda", "Int8WeightOnlyConfig", torch.bfloat16,
                           "torchao int8 weight-only, bf16 activations"),
    ("cuda", INT4): Kernel(INT4, "cuda", "Int4WeightOnlyConfig", torch.bfloat16,
                           "torchao int4 tile-packed (aten _weight_int4pack_mm), bf16"),
}
# where fbgemm is not torch's quantized engine (ARM CPUs: qnnpack), int8 on a CPU is aten's
# weight-only kernel, with bf16 activations
CPU_INT8_WEIGHT_ONLY = Kernel(INT8, "cpu", ATEN_INT8, torch.bfloat16,
                              "aten int8 weight-only (per-row scales), bf16 activations")
FALLBACK = {INT4: INT8, INT8: NONE}


def torchao_version() -> str | None:
    """torchao's version, None where it cannot be imported. Its import-time warnings about
    kernels for other hardware stay out of the log (model/__init__.py)."""
    try:
        import torchao
    except Exception:  # noqa: BLE001 - torchao missing or broken: no kernels
        return None
    return str(torchao.__version__)


def fbgemm_available() -> bool:
    """Whether torch's quantized engine here runs fbgemm's dynamic int8 linear (x86)."""
    return (torch.backends.quantized.engine in ("x86", "fbgemm")
            and hasattr(torch.ops.quantized, "linear_dynamic"))


def kernel_for(scheme: str, device: torch.device) -> Kernel | None:
    """The kernel `scheme` runs with on `device`; None where it has none here (torchao's
    kernels need torchao; torch's own kernels only torch)."""
    kernel = None if scheme == NONE else KERNELS.get((device.type, scheme))
    if kernel is not None and kernel.config == FBGEMM_INT8 and not fbgemm_available():
        kernel = CPU_INT8_WEIGHT_ONLY
    if kernel is None or (kernel.config not in OWN_KERNELS and torchao_version() is None):
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
    elif scheme == INT4 and device.type == "cpu":
        from model.catalog.cpu import has_native_bf16

        notice = None if has_native_bf16() else INT4_CPU_NOTICE
    return Plan(asked, scheme, kernel_for(scheme, device), notice)


# every CPU int4 kernel measured on an AVX2 CPU without native bf16 took longer than int8
# (docs/benchmarks.md: 8- and 4-bit weights on a CPU), so there int4 is for memory only
INT4_CPU_NOTICE = ("quantization int4 on this CPU saves memory, not time: without native bf16 "
                   "its kernel is slower than int8's (docs/benchmarks.md); int8 is faster here")


# -- auto ------------------------------------------------------------------------------------

# auto on a CPU: int8 through fbgemm where that is the kernel, the CPU has no native bf16 and the
# network is large enough for the weights' bytes to dominate a step; else unquantized. Measured
# side by side on the 2-core AVX2 VM (docs/benchmarks.md, 0.5B shape): fbgemm's int8 took about
# half of float32's time for a typed character while aten's weight-only int8 and torchao's
# int4 took about as long as float32; int8 gave the bundled model's completions (docs/models.md).
# With native bf16 the bf16 network (model.catalog.cpu) was measured and int8 was not: none there.
CPU_INT8_FROM = 100_000_000  # linear parameters from which auto quantizes on such a CPU


def weight_bytes(parameters: int, linear_parameters: int, scheme: str,
                 dtype_bytes: float = 2.0, kernel: Kernel | None = None,
                 head_parameters: int = 0, tied: bool = False) -> int:
    """Bytes the weights take: the linears in `scheme`, the rest in `dtype_bytes` a value, or,
    with `kernel`, in its dtype and with the head in int8 where it quantizes the head
    (model.catalog.registry.weights_bytes)."""
    from model.catalog.registry import weights_bytes

    if kernel is not None:
        dtype_bytes = kernel.dtype.itemsize
    return int(weights_bytes(parameters, linear_parameters, scheme, dtype_bytes,
                             head_parameters, kernel is not None and kernel.head, tied))


def choose_auto(device: torch.device, parameters: int, linear_parameters: int,
                free_bytes: int | None = None) -> Plan:
    """`auto`: on CUDA the first of none / int8 / int4 whose weights leave CUDA_ROOM of the
    free memory for the document caches (QuantizationError naming what would fit where none
    does); on a CPU `cpu_auto`'s choice."""
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
    scheme = cpu_auto(linear_parameters)
    plan = nearest_working(scheme, device, AUTO)
    notice = plan.notice or (f"quantization auto: int8 on this CPU ({plan.kernel.description})"
                             if plan.scheme == INT8 else None)
    return Plan(AUTO, plan.scheme, plan.kernel, notice)


def cpu_auto(linear_parameters: int) -> str:
    """`auto` on a CPU: int8 where fbgemm runs it, the CPU lacks native bf16 and the network
    has CPU_INT8_FROM linear parameters or more (measured faster there); else none."""
    from model.catalog.cpu import has_native_bf16

    if (linear_parameters >= CPU_INT8_FROM and fbgemm_available()
            and not has_native_bf16()):
        return INT8
    return NONE


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

    scale_dtype: torch.dtype | None = None  # the scales' dtype; None: the weight's

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8RowWeight:
        """Symmetric per-row int8 of a float (N, K) weight, computed in float32 a block of
        rows at a time (QUANTIZE_BLOCK values), so that quantizing a large matrix (an LM
        head of 150k rows) never holds more than a block of float temporaries."""
        rows, width = weight.shape
        step = max(1, QUANTIZE_BLOCK // max(1, width))
        qdata = torch.empty(rows, width, dtype=torch.int8, device=weight.device)
        scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
        for start in range(0, rows, step):
            wide = weight[start:start + step].detach().float()
            block = wide.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
            qdata[start:start + step] = (wide / block[:, None]).round_().clamp_(-127, 127)
            scale[start:start + step] = block
        return cls(qdata, scale.to(cls.scale_dtype or weight.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).to(self.scale.dtype) * self.scale[:, None]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
            y = weight.matmul_rows(rows).reshape(*x.shape[:-1], weight.shape[0])
            return y if bias is None else y + bias
        if func is torch.Tensor.detach:
            return cls(args[0].as_subclass(torch.Tensor).detach(), args[0].scale)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def matmul_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) times the weight's transpose: (M, N), in the rows' dtype."""
        return torch.ops.aten._weight_int8pack_mm(rows, self.as_subclass(torch.Tensor),
                                                  self.scale)


ROW_MAGNITUDE_SPREAD = 8.0  # a row whose largest activation is this far above the median's


def magnitude_groups(rows: torch.Tensor) -> list[torch.Tensor]:
    """`rows` (M, K) split into groups of row indices that can share one activation scale: the
    rows whose largest absolute value is at most ROW_MAGNITUDE_SPREAD times the median row's
    (the usual case: one group), then the rows above it, each group spanning at most that
    factor."""
    peaks = rows.abs().amax(dim=1)
    bulk_limit = float(peaks.median()) * ROW_MAGNITUDE_SPREAD
    if float(peaks.max()) <= bulk_limit:
        return [torch.arange(rows.shape[0], device=rows.device)]
    groups = [torch.nonzero(peaks <= bulk_limit).flatten()]
    order = torch.argsort(peaks)
    outliers = [int(i) for i in order if float(peaks[i]) > bulk_limit]
    start = 0
    for end in range(1, len(outliers) + 1):
        if end == len(outliers) or \
                float(peaks[outliers[end]]) > ROW_MAGNITUDE_SPREAD * float(peaks[outliers[start]]):
            groups.append(torch.tensor(outliers[start:end], device=rows.device))
            start = end
    return groups


class Int8DynamicWeight(Int8RowWeight):
    """`Int8RowWeight` whose `F.linear` runs fbgemm's dynamic int8 kernel
    (`quantized::linear_dynamic`, torch's own x86 kernel): each call quantizes the float32
    activations to 8 bits (one scale for the call's rows; 7 bits of range, `reduce_range`,
    so that AVX2's 16-bit pair sums cannot saturate), multiplies int8 by int8 into int32 and
    scales back. It reads a quarter of float32's bytes and runs integer dot products, which a
    CPU without native bf16 lacks for bf16. One scale for all rows would let one row of large
    activations (a network's "massive activations", at its first token) flatten every other
    row to zero, so rows of very different magnitudes are multiplied in separate calls
    (`magnitude_groups`). The packed form fbgemm reads is made on first use and never saved
    (`__getstate__`): the disk cache keeps the int8 values and scales."""

    def matmul_rows(self, rows: torch.Tensor) -> torch.Tensor:
        packed = self.__dict__.get("_packed")
        if packed is None:
            qdata = self.as_subclass(torch.Tensor)
            with warnings.catch_warnings():  # quantized tensors are deprecated; the kernel is not
                warnings.simplefilter("ignore", UserWarning)
                weight = torch._make_per_channel_quantized_tensor(
                    qdata, self.scale.double(), torch.zeros(qdata.shape[0], dtype=torch.long), 0)
            packed = self.__dict__["_packed"] = torch.ops.quantized.linear_prepack(weight, None)
        wide = rows.float()
        groups = magnitude_groups(wide)
        if len(groups) == 1:
            return torch.ops.quantized.linear_dynamic(wide, packed, True).to(rows.dtype)
        y = wide.new_empty(wide.shape[0], self.shape[0])
        for group in groups:
            y[group] = torch.ops.quantized.linear_dynamic(wide[group], packed, True)
        return y.to(rows.dtype)

    scale_dtype = torch.float32

    def __getstate__(self) -> dict:
        return {"scale": self.scale}


def quantize_module(module: nn.Module, kernel: Kernel) -> int:
    """Quantize `module`'s linear layers in place with `kernel` (their weights already in
    `kernel.dtype` on the target device). Returns how many were quantized; a layer no group
    size fits stays as it is."""
    done = 0
    for _, linear in quantizable(module):
        if kernel.config in OWN_KERNELS:
            kind = Int8DynamicWeight if kernel.config == FBGEMM_INT8 else Int8RowWeight
            linear.weight = nn.Parameter(kind.quantize(linear.weight), requires_grad=False)
            done += 1
            continue
        config = kernel.make_config(linear.in_features)
        if config is None:
            continue
        from torchao.quantization import quantize_

        quantize_(linear, config, filter_fn=None)
        done += 1
    return done


def quantize_head(network: nn.Module, kernel: Kernel) -> bool:
    """The LM head in `kernel`'s bits where the kernel says it is safe (`Kernel.head`),
    untied from the embedding (which keeps its values: a lookup cannot read int8 rows; the
    loader does not tie a quantized head again). Returns whether it was quantized."""
    if not kernel.head or is_quantized(network.lm_head.weight):
        return False
    head = network.lm_head
    head.weight = nn.Parameter(head.weight.detach(), requires_grad=False)  # its own, untied
    quantize_module(head, kernel)
    return True


def tie_or_quantize_head(network: nn.Module, kernel: Kernel | None) -> None:
    """Once a network's weights are in: its head tied to the embedding where its config says
    so (never a quantized head again), then quantized where `kernel` says (`quantize_head`)."""
    if network.config.tie_word_embeddings and not is_quantized(network.lm_head.weight):
        network.tie_weights()
    if kernel is not None:
        quantize_head(network, kernel)


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
