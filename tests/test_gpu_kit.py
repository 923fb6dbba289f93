"""The GPU run kit on the CPU: a run packed into small parts comes back bit for bit, training
resumes from the weights alone, the bf16 autocast path trains, and the GPU benchmark's
random-model path runs at a tiny shape."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import benchmarks.model_speed as bench
import benchmarks.report as report
import model.train.train as train_mod
from model.network.loader import BUNDLED_DIR, ModelLoadError
from model.network.shapes import random_model_of_shape
from model.train import gpu_kit
from model.train.train import LAST_CHECKPOINT, train
from tests.helpers import tiny_config

SHIPPED_TOKENIZER = BUNDLED_DIR / "tokenizer.json"
CODE = "".join(f"def f{i}(x):\n    if x > {i}:\n        return x * {i}\n    return None\n\n\n"
               for i in range(200))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    if not SHIPPED_TOKENIZER.exists():
        pytest.skip("no shipped tokenizer")
    out = tmp_path_factory.mktemp("data")
    ids = Tokenizer.from_file(str(SHIPPED_TOKENIZER)).encode(CODE, add_special_tokens=False).ids
    for split in ("train", "validation"):
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
    return out


def test_pack_and_join_round_trip_the_weights_bit_for_bit(tmp_path):
    run, out, back = tmp_path / "run", tmp_path / "out", tmp_path / "back"
    run.mkdir()
    embedding = torch.randn(64, 48)
    weights = {"w": embedding, "lm_head": embedding, "step_ids": torch.arange(5)}  # tied
    torch.save({"model": weights, "optimizer": {"state": {0: torch.randn(64, 48)}},
                "state": {"step": 7, "tokens": 70}, "config": {}, "hf_config": {}},
               run / LAST_CHECKPOINT)
    (run / "log.jsonl").write_text('{"event": "start"}\n')
    (run / "tokenizer.json").write_text("{}")
    kit = gpu_kit.pack(run, out, part_bytes=4096)
    assert len(kit["parts"]) > 1
    assert all((out / name).stat().st_size <= 4096 for name in kit["parts"])
    gpu_kit.join(out, back)
    joined = torch.load(back / LAST_CHECKPOINT, weights_only=False)
    assert joined["optimizer"] is None and joined["state"]["step"] == 7
    assert torch.equal(joined["model"]["w"], weights["w"].half())  # float16, exactly
    assert torch.equal(joined["model"]["step_ids"], weights["step_ids"])
    # tied weights stay one tensor: carried once, not twice
    assert joined["model"]["lm_head"].data_ptr() == joined["model"]["w"].data_ptr()
    (out / kit["parts"][-1]).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="do not add up"):
        gpu_kit.join(out, tmp_path / "again")


def test_bf16_autocast_trains_and_resumes_from_packed_weights(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "autocast",
                        lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    run = tmp_path / "run"
    train(data_dir, SHIPPED_TOKENIZER, run, tiny_config(3), minutes=5,
          device=torch.device("cpu"), progress_bar=False)
    gpu_kit.pack(run, tmp_path / "out")
    gpu_kit.join(tmp_path / "out", tmp_path / "back")
    state = train(data_dir, SHIPPED_TOKENIZER, tmp_path / "back", tiny_config(6), minutes=5,
                  device=torch.device("cpu"), resume=True, progress_bar=False)
    assert state["step"] == 6
    log = [json.loads(line) for line in (tmp_path / "back" / "log.jsonl").open()]
    assert [r["resumed"] for r in log if r["event"] == "start"] == [False, True]
    evals = [r for r in log if r["event"] == "eval"]
    assert len(evals) == 2 and all(np.isfinite(r["val_loss"]) for r in evals)
    # a fresh optimiser warms up again from the resumed step, to the cosine's value
    config = tiny_config(6)
    first = train_mod.learning_rate(config, 3, 0.5, warm_from=3)
    assert first == pytest.approx(train_mod.learning_rate(config, 9, 0.5) / config.warmup_steps)


def test_random_model_of_a_tiny_shape_runs_the_gpu_benchmark_path_on_cpu(tmp_path, monkeypatch):
    if not report.EVAL_DATA.exists():
        pytest.skip("../shared eval data absent")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    args = SimpleNamespace(name="vs-autoregressive", shape="tiny-qwen2", device="cpu",
                           data=None, limit=1, max_tokens=4, tokens_per_step=2, threads=None,
                           quantization="auto")
    assert bench.run_bench(args) == 0
    payload = json.loads((tmp_path / "vs-autoregressive-tiny-qwen2.json").read_text())
    # dtype auto: fp32 on a CPU for a model under 100M parameters (bf16 on CUDA)
    assert payload["model"] == "random:tiny-qwen2" and payload["dtype"] == "torch.float32"
    assert payload["rows"][0]["steps"] == 2  # 4 tokens, 2 per step
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        random_model_of_shape("qwen2.5-7b", "cpu")


def test_training_refuses_a_network_whose_attention_is_causal():
    network = train_mod.build_network(64, tiny_config(1).model, SimpleNamespace(
        bos=0, eos=1, end_of_hole=3), torch.device("cpu"))
    train_mod.check_bidirectional(network, 64, torch.device("cpu"))  # as built: bidirectional
    network.config.is_causal = True  # as benchmarks.model_speed does for autoregressive decoding
    for module in network.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = True
    with pytest.raises(RuntimeError, match="causal"):
        train_mod.check_bidirectional(network, 64, torch.device("cpu"))
