"""Weight-quantization kernels on this CPU, side by side: what `int8` / `int4` can mean here.

The 0.5B shape's layer stack (Open-dCoder-0.5B = Qwen2.5-0.5B: 24 layers of q, k, v, o,
gate, up, down projections; model.network.shapes) multiplies HOLE_ROWS rows (a 16-token hole)
through every projection, the way a hole step reads the weights. Each candidate is timed in the same
run, median of REPEATS after a warm-up, and its output compared with float32's:

- float32 / bfloat16 `F.linear` (float32 is what `dtype: auto` picks on a CPU without native
  bf16 dot products, model.catalog.cpu), bfloat16 also under torch.compile;
- torch's own CPU kernels: `aten._weight_int8pack_mm` (int8 weights, one scale per output
  channel) and `aten._weight_int4pack_mm_for_cpu` (int4, groups of INT4_GROUP);
- `torch.ao.quantization.quantize_dynamic` (fbgemm int8 weights and activations);
- torchao's `Int8WeightOnlyConfig` eager and compiled, `Int4WeightOnlyConfig` (its CPU
  layout), where torchao is installed;
- OpenVINO's weight compression (int8 / int4 weight constants a MatMul decompresses, which
  its CPU plugin runs as a weight-compressed FullyConnected), where openvino is installed.

Run: `python -m benchmarks.quant_kernels` (JSON in benchmarks/results/quant-kernels.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.report import machine, save
from model.catalog.cpu import auto_cpu_dtype, describe
from model.network.shapes import SHAPES

SHAPE = "qwen2.5-0.5b"
HOLE_ROWS = 16
REPEATS = 8
INT4_GROUP = 128
INT4_INNER_K_TILES = 2
NAME = "quant-kernels"


def projection_shapes(shape: str = SHAPE) -> list[tuple[int, int]]:
    """(out, in) of every projection of one decoder layer of `shape`."""
    s = SHAPES[shape]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = hidden // s["num_attention_heads"] * s["num_key_value_heads"]
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
            (inter, hidden), (inter, hidden), (hidden, inter)]


def make_weights(shape: str = SHAPE, layers: int | None = None) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    count = SHAPES[shape]["num_hidden_layers"] if layers is None else layers
    return [torch.randn(out, inp, generator=generator) * 0.02
            for _ in range(count) for out, inp in projection_shapes(shape)]


def stack(linears: list[Callable[[torch.Tensor], torch.Tensor]], inputs: dict[int, torch.Tensor],
          in_features: list[int]) -> Callable[[], list[torch.Tensor]]:
    """Every projection applied to a (HOLE_ROWS, in) input: the bytes a hole step reads. Each
    output then goes through a torch SiLU, as a layer's next operation would, so that a kernel
    on a thread pool of its own pays for handing the cores back to torch's."""
    def run() -> list[torch.Tensor]:
        outputs = []
        for linear, k in zip(linears, in_features, strict=True):
            outputs.append(linear(inputs[k]))
            if isinstance(outputs[-1], torch.Tensor):
                F.silu(outputs[-1])
        return outputs
    return run


def interleaved_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each run timed `repeats` times, the candidates taking turns (round r times every
    candidate once), so that a noisy neighbour slows them all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, run in runs.items():
                began = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - began) * 1e3)
    return times


def per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8), scale


def int4_groups(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 (0..15) in groups along K: (N, K) int32 values and (K/g, N, 2) bf16
    scales and zeros in the layout `_weight_int4pack_mm_for_cpu` reads."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((g - low) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1)
    return q, scales_zeros.contiguous().to(torch.bfloat16)


def candidates(weights: list[torch.Tensor], have: dict[str, bool]) -> dict[str, Callable]:
    """name -> a factory returning the list of per-projection callables (built lazily, so a
    candidate that fails to build is reported, not fatal)."""
    made: dict[str, Callable] = {}

    copies: dict[torch.dtype, list[torch.Tensor]] = {}

    def dense(dtype: torch.dtype, compiled: bool = False):
        def build():
            function = torch.compile(F.linear) if compiled else F.linear
            converted = copies.setdefault(dtype, [w.to(dtype) for w in weights])
            return [partial(lambda x, w: function(x.to(dtype), w), w=w) for w in converted]
        return build

    made["float32"] = dense(torch.float32)
    made["bfloat16"] = dense(torch.bfloat16)
    made["bfloat16 compiled"] = dense(torch.bfloat16, True)

    def int8pack(dtype: torch.dtype):
        def build():
            out = []
            for w in weights:
                q, scale = per_channel_int8(w)
                out.append(partial(lambda x, q, s: torch.ops.aten._weight_int8pack_mm(
                    x.to(dtype), q, s), q=q, s=scale.to(dtype)))
            return out
        return build

    made["aten._weight_int8pack_mm float32"] = int8pack(torch.float32)
    made["aten._weight_int8pack_mm bfloat16"] = int8pack(torch.bfloat16)

    def int4pack(dtype: torch.dtype):
        def build():
            out = []
            for w in weights:
                q, sz = int4_groups(w)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
                out.append(partial(lambda x, p, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x.to(dtype), p, INT4_GROUP, sz), p=packed, sz=sz.to(dtype)))
            return out
        return build

    made["aten._weight_int4pack_mm_for_cpu float32"] = int4pack(torch.float32)
    made["aten._weight_int4pack_mm_for_cpu bfloat16"] = int4pack(torch.bfloat16)
    made["aten._weight_int4pack_mm_for_cpu float16"] = int4pack(torch.float16)

    def dynamic_int4():
        """aten's `_dyn_quant_matmul_4bit` (int4 weights in groups, activations quantized per
        call: KleidiAI's kernel on ARM, torch's reference elsewhere)."""
        out = []
        for w in weights:
            n, k = w.shape
            q, scale = symmetric_int4_groups(w)
            nibbles = (q + 8).to(torch.uint8)
            packed = torch.ops.aten._dyn_quant_pack_4bit_weight(
                (nibbles[:, 1::2] << 4 | nibbles[:, ::2]).contiguous(), scale, None,
                INT4_GROUP, k, n)
            out.append(partial(lambda x, p, k, n: torch.ops.aten._dyn_quant_matmul_4bit(
                x, p, INT4_GROUP, k, n), p=packed, k=k, n=n))
        return out

    made["aten._dyn_quant_matmul_4bit float32 (int8 activations)"] = dynamic_int4

    def dynamic():
        modules = []
        for w in weights:
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w
            modules.append(torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8))
        return modules

    made["torch.ao quantize_dynamic int8 (float32)"] = dynamic

    if have["torchao"]:
        quantized: dict[str, list[torch.nn.Module]] = {}

        def torchao_build(config_name: str, dtype: torch.dtype, compiled: bool, **kwargs):
            def quantize() -> list[torch.nn.Module]:
                import torchao.prototype.quantization.int4 as prototype
                import torchao.quantization as tq

                source = prototype if config_name.startswith("Prototype") else tq
                config = getattr(source, config_name)(**kwargs)
                out = []
                for w in weights:
                    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
                    linear.weight.data = w.to(dtype)
                    tq.quantize_(linear, config)
                    out.append(linear)
                return out

            def build():
                modules = quantized.setdefault(f"{config_name} {dtype}", None) or quantize()
                quantized[f"{config_name} {dtype}"] = modules
                modules = [torch.compile(m) if compiled else m for m in modules]
                return [lambda x, m=m: m(x.to(dtype)) for m in modules]
            return build

        for dtype in (torch.float32, torch.bfloat16):
            label = str(dtype).removeprefix("torch.")
            made[f"torchao Int8WeightOnly {label}"] = torchao_build(
                "Int8WeightOnlyConfig", dtype, False)
            made[f"torchao Int8WeightOnly {label} compiled"] = torchao_build(
                "Int8WeightOnlyConfig", dtype, True)
        made["torchao Int4WeightOnly bfloat16 (opaque CPU layout)"] = torchao_build(
            "Int4WeightOnlyConfig", torch.bfloat16, False, group_size=INT4_GROUP,
            int4_packing_format="opaque")
        for dtype in (torch.float32, torch.bfloat16):
            label = str(dtype).removeprefix("torch.")
            made[f"torchao PrototypeInt4WeightOnly (Int4OpaqueTensor) {label}"] = torchao_build(
                "PrototypeInt4WeightOnlyConfig", dtype, False, group_size=INT4_GROUP)
        from torchao.quantization.granularity import PerGroup

        made["torchao Int8DynamicActivationIntxWeight int4 float32"] = torchao_build(
            "Int8DynamicActivationIntxWeightConfig", torch.float32, False,
            weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP))
        made["torchao IntxWeightOnly int4 float32"] = torchao_build(
            "IntxWeightOnlyConfig", torch.float32, False, weight_dtype=torch.int4,
            granularity=PerGroup(INT4_GROUP))
    if have["openvino"]:
        made["openvino int8 weights (f32 activations)"] = lambda: openvino_stack(weights, 8)
        made["openvino int4 weights (f32 activations)"] = lambda: openvino_stack(weights, 4)
        made["openvino int8 weights, one model per projection"] = lambda: [
            openvino_linear(w, 8) for w in weights]
        made["openvino int4 weights, one model per projection"] = lambda: [
            openvino_linear(w, 4) for w in weights]
    return made


def symmetric_int4_groups(w: torch.Tensor, group: int = INT4_GROUP
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 (-8..7) in groups along K: (N, K) values and (N, K/g) float32 scales."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    scale = (g.abs().amax(-1) / 7).clamp(min=1e-8)
    return torch.round(g / scale[..., None]).clamp(-8, 7).reshape(n, k), scale


def openvino_weight(w: torch.Tensor, bits: int):  # noqa: ANN201 - an OpenVINO node
    """w as an OpenVINO constant of int8 (a scale per row) or int4 (groups of INT4_GROUP)
    values, decompressed to f32 in the graph (what its CPU plugin fuses into the MatMul)."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    n, k = w.shape
    if bits == 8:
        q, scale = per_channel_int8(w)
        return ops.multiply(ops.convert(ops.constant(q.numpy(), ov.Type.i8), ov.Type.f32),
                            ops.constant(scale[:, None].numpy().astype(np.float32)))
    q, scale = symmetric_int4_groups(w)
    values = q.reshape(n, k // INT4_GROUP, INT4_GROUP).to(torch.int8).numpy()
    deq = ops.multiply(ops.convert(ops.constant(values, ov.Type.i4), ov.Type.f32),
                       ops.constant(scale[..., None].numpy()))
    return ops.reshape(deq, ops.constant(np.array([n, k], dtype=np.int64)), False)


def openvino_linear(w: torch.Tensor, bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """One compiled OpenVINO model for one projection, called like F.linear with rows of any
    count: how a per-module OpenVINO weight would run inside the torch network."""
    import openvino as ov
    import openvino.opset13 as ops

    rows = ops.parameter([-1, w.shape[1]], ov.Type.f32)
    model = ov.Model([ops.matmul(rows, openvino_weight(w, bits), False, True)], [rows])
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": str(torch.get_num_threads())})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.numpy()}, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run


def openvino_stack(weights: list[torch.Tensor], bits: int) -> list[Callable]:
    """One compiled OpenVINO model of all projections (each a MatMul with a decompressed
    low-bit weight constant), as a single callable standing for the whole stack (the first
    entry; the others are no-ops) so that per-call overhead is paid once, as in a real model."""
    import openvino as ov
    import openvino.opset13 as ops

    parameters, outputs = {}, []
    for w in weights:
        k = w.shape[1]
        if k not in parameters:
            parameters[k] = ops.parameter([HOLE_ROWS, k], ov.Type.f32, name=f"x{k}")
        outputs.append(ops.matmul(parameters[k], openvino_weight(w, bits), False, True))
    model = ov.Model(outputs, list(parameters.values()))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    names = list(parameters)

    def run_all(x: torch.Tensor) -> object:
        inputs = {i: torch.randn(HOLE_ROWS, k).numpy() for i, k in enumerate(names)}
        return request.infer(inputs)

    return [run_all] + [lambda x: None] * (len(weights) - 1)


def available(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception:
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a quick look)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--only", default=None, help="comma-separated substrings of names")
    parser.add_argument("--skip", default=None, help="comma-separated substrings of names")
    parser.add_argument("--save", default=None, help="save the JSON under this name too")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    weights = make_weights(SHAPE, args.layers)
    in_features = [w.shape[1] for w in weights]
    inputs = {k: torch.randn(HOLE_ROWS, k) for k in set(in_features)}
    have = {"torchao": available("torchao"), "openvino": available("openvino")}
    reference = [F.linear(inputs[k], w) for w, k in zip(weights, in_features, strict=True)]
    wanted = None if args.only is None else args.only.split(",")
    built: dict[str, Callable] = {}
    rows: dict[str, dict] = {}
    for name, build in candidates(weights, have).items():
        if wanted and not any(w in name for w in wanted):
            continue
        if args.skip and any(w in name for w in args.skip.split(",")):
            continue
        rows[name] = {"kernel": name}
        try:
            run = stack(build(), inputs, in_features)
            with torch.inference_mode():
                run()  # warm-up (and compilation)
                outputs = run()
            built[name] = run
            if all(isinstance(o, torch.Tensor) for o in outputs):
                rows[name]["max_relative_error"] = round(max(
                    float((o.float() - r).norm() / r.norm())
                    for o, r in zip(outputs, reference, strict=True)), 4)
        except Exception as error:  # a kernel this build lacks: recorded, not fatal
            rows[name]["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            print(rows[name], flush=True)
    times = interleaved_ms(built, args.repeats)
    for name, ms in times.items():
        rows[name]["ms"] = round(statistics.median(ms), 2)
        print(rows[name], flush=True)
    rows = list(rows.values())
    base = next(r["ms"] for r in rows if r["kernel"] == "float32" and "ms" in r) \
        if any(r["kernel"] == "float32" and "ms" in r for r in rows) else None
    for row in rows:
        if base and "ms" in row:
            row["vs_float32"] = round(row["ms"] / base, 2)
    parameters = sum(w.numel() for w in weights)
    payload = {"machine": machine(), "cpu": describe(), "shape": SHAPE,
               "layers": args.layers or SHAPES[SHAPE]["num_hidden_layers"],
               "rows": HOLE_ROWS, "repeats": args.repeats,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "auto_dtype": str(auto_cpu_dtype(494_000_000)).removeprefix("torch."),
               "linear_parameters": parameters,
               "versions": {"torch": torch.__version__, "torchao": version("torchao"),
                            "openvino": version("openvino"),
                            "intel_extension_for_pytorch": version(
                                "intel_extension_for_pytorch")},
               "kernels": rows}
    if args.save or (args.layers is None and wanted is None and args.skip is None):
        print(save(args.save or NAME, payload))
    return payload


if __name__ == "__main__":
    main()
