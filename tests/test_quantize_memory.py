"""The streamed quantized load bounds peak memory: about the quantized network plus one layer.

A random-weight checkpoint of a few hundred MB of float32 (a Qwen2 config as tiny.py writes it,
widened, in several safetensors shards) is loaded in a fresh process, and the growth of that
process's peak resident memory (VmHWM, reset before the load) is compared with the quantized
network's own bytes. A load that makes the float network first and quantizes it afterwards is
measured the same way, to show that the bound tells the two apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.network.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 24,
         "num_attention_heads": 8, "num_key_value_heads": 2}
SHARDS = 4
MIB = 2**20
# what a load adds beyond the quantized weights and one layer's float weights (the float
# layer's quantization temporaries, the kept copy's serialisation, allocator slack): measured
# 38-40 MiB for this shape on the 2-core VM, bounded here with room to spare
FIXED_OVERHEAD = 48 * MIB

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="peak memory is read from /proc (Linux)")

CHILD = r"""
import gc, json, sys
from pathlib import Path
from model.network.loader import load_model, quantized_copy
from model.network.quantize import stored_bytes

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return False
    return True

def measure(load):
    gc.collect()
    base, reset = status("VmRSS"), reset_peak()
    network = load()
    return network, {"growth": status("VmHWM") - base, "reset": reset,
                     "kept": status("VmRSS") - base,
                     "stored": sum(stored_bytes(t) for t in network.state_dict().values())}

big, small, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if mode == "streamed":
    load_model(small, device="cpu", quantization="int8")  # imports, kernels: not the load's
    model, first = measure(lambda: load_model(big, device="cpu", quantization="int8").network)
    del model
    model, second = measure(lambda: load_model(big, device="cpu", quantization="int8").network)
    print(json.dumps({"first": first, "cached": second}))
else:  # the float network first, quantized afterwards
    quantized_copy(load_model(small, device="cpu", quantization="none"), "int8")
    model, first = measure(lambda: quantized_copy(
        load_model(big, device="cpu", quantization="none"), "int8").network)
    print(json.dumps({"first": first}))
"""


def layer_float_bytes(vocab: int = 0) -> tuple[int, int]:
    """(one decoder layer's float32 bytes, the whole checkpoint's) for SHAPE."""
    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    layer = 2 * h * h + 2 * kv * h + 3 * h * i + h + 2 * kv + 2 * h
    return 4 * layer, 4 * (layer * SHAPE["num_hidden_layers"] + 2 * vocab * h + h)


def write_sharded(directory: Path) -> int:
    """A float32 checkpoint of SHAPE in SHARDS files, written a shard at a time; its vocab."""
    write_tiny_model(directory, "open-dcoder")
    (directory / "model.safetensors").unlink()
    config = json.loads((directory / "config.json").read_text())
    config.update(SHAPE)
    config.pop("layer_types", None)  # tiny.py's two-layer list
    (directory / "config.json").write_text(json.dumps(config))
    h, i, layers, vocab = (SHAPE["hidden_size"], SHAPE["intermediate_size"],
                           SHAPE["num_hidden_layers"], config["vocab_size"])
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    generator = torch.Generator().manual_seed(0)

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * 0.02

    per_shard = -(-layers // SHARDS)
    for shard in range(SHARDS):
        state = {"model.embed_tokens.weight": normal(vocab, h)} if shard == 0 else {}
        for number in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            p = f"model.layers.{number}."
            state |= {
                p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.q_proj.bias": normal(h),
                p + "self_attn.k_proj.weight": normal(kv, h),
                p + "self_attn.k_proj.bias": normal(kv),
                p + "self_attn.v_proj.weight": normal(kv, h),
                p + "self_attn.v_proj.bias": normal(kv),
                p + "self_attn.o_proj.weight": normal(h, h),
                p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
                p + "mlp.down_proj.weight": normal(h, i),
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
            }
        if shard == SHARDS - 1:
            state |= {"model.norm.weight": torch.ones(h), "lm_head.weight": normal(vocab, h)}
        save_file(state, str(directory / f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"))
    return vocab


def run_child(tmp_path: Path, big: Path, mode: str) -> dict:
    env = {**os.environ, "DIFFUSION_LSP_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(big), str(tmp_path / "small"), mode],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_streamed_int8_load_peaks_at_the_quantized_size_plus_one_layer(tmp_path):
    big = tmp_path / "big"
    vocab = write_sharded(big)
    write_tiny_model(tmp_path / "small", "open-dcoder")
    layer, whole = layer_float_bytes(vocab)
    streamed = run_child(tmp_path, big, "streamed")
    if not streamed["first"]["reset"]:
        pytest.skip("this kernel does not let a process reset its peak memory (clear_refs)")
    float_first = run_child(tmp_path, big, "float-first")["first"]

    first, cached = streamed["first"], streamed["cached"]
    bound = first["stored"] + 2 * layer + FIXED_OVERHEAD
    report = (f"peak growth streamed {first['growth'] / MIB:.0f} MiB, from the kept copy "
              f"{cached['growth'] / MIB:.0f} MiB, float first {float_first['growth'] / MIB:.0f}"
              f" MiB, kept after the load {first['kept'] / MIB:.0f} MiB; bound "
              f"{bound / MIB:.0f} MiB (quantized {first['stored'] / MIB:.0f} + two "
              f"float layers {2 * layer / MIB:.0f} + {FIXED_OVERHEAD // MIB}); float "
              f"checkpoint {whole / MIB:.0f} MiB")
    assert whole > 3 * first["stored"], report  # the difference is unmistakable
    assert first["growth"] <= bound, report
    assert first["growth"] < whole / 2, report
    assert cached["growth"] <= bound, report
    # what stays after the load: the quantized network, not freed float layers glibc kept
    # (without malloc_trim the same load peaked 127 to 472 MiB and kept up to 423, by chance)
    assert first["kept"] <= first["stored"] + FIXED_OVERHEAD, report
    # the bound tells a load that holds the float network apart
    assert float_first["growth"] > bound and float_first["growth"] > whole * 0.9, report
