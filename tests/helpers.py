"""Helpers more than one test file uses (test files never import each other)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.decoding import fast_step
from model.decoding.fast_step import graphs, layer, switchboard
from model.train.data import ExampleShape
from model.train.train import ModelShape, TrainConfig

# -- training (tests/test_train.py, tests/test_gpu_kit.py) ---------------------------------------

TINY = ModelShape(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256)


def tiny_config(max_steps: int) -> TrainConfig:
    return TrainConfig(model=TINY, shape=ExampleShape(seq_len=64, max_hole=16, max_extra=4),
                       batch_size=2, warmup_steps=2, max_steps=max_steps, eval_every_s=1e9,
                       save_every_s=1e9, validation_batches=1)


# -- tokenizer files (tests/test_bpe_files.py, tests/test_hub.py) ---------------------------------


def split_tokenizer_json(directory: Path) -> dict[str, int]:
    """Rewrite directory/tokenizer.json as vocab.json + merges.txt + added_tokens.json (the
    specials) + tokenizer_config.json; returns the added tokens."""
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    (directory / "added_tokens.json").write_text(json.dumps(added))
    (directory / "tokenizer.json").unlink()
    return added


def sharp_logits(model, tokens: list[int], confidence: float = 20.0) -> torch.Tensor:
    """(m, V) logits that put all mass on `tokens` (one row per masked position)."""
    logits = torch.zeros(len(tokens), model.vocab_size)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = confidence
    return logits


def word_token(model, word: str) -> int:
    """The first token id of `word` in the model's tokenizer."""
    return model.tokenizer.encode(word, add_special_tokens=False).ids[0]


# -- tiny models on a busy machine; the fast step as on CUDA (tests/test_fast_step.py,
# tests/test_quantize.py, tests/test_families.py, tests/test_block.py) ----------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a busy 2-core machine run ~20x faster without OpenMP fan-out."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def patch_fast_step(monkeypatch, name: str, value) -> None:
    """Set a name of the fast step both where its module reads it and where the package hands
    it on (`model.decoding.fast_step` re-exports its parts' public names)."""
    homes = [part for part in (switchboard, layer, graphs) if hasattr(part, name)]
    assert homes, f"no fast_step part defines {name}"
    for target in (*homes, fast_step):
        monkeypatch.setattr(target, name, value)


def as_on_cuda(monkeypatch, model, env: dict[str, str]) -> fast_step.HoleSteps:
    """Every pass through `model.decoding.fast_step` as on CUDA, with the switches of `env` (eager
    here: the graphs would replay these kernels); returns the fixed shapes it uses."""
    steps = fast_step.HoleSteps(model, graphs=False)
    patch_fast_step(monkeypatch, "enabled", lambda m: True)
    patch_fast_step(monkeypatch, "hole_steps", lambda m: steps)
    for variable in fast_step.SWITCH_ENVS.values():
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    return steps


def hole_pass_both_ways(model, state) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of the window: transformers' hole-only pass, then the fixed-shape step."""
    from model.decoding.passes import _hole_pass, window

    (reference,) = _hole_pass(model, [state])
    state.context.age -= 1
    start, end = window(state, model.family.shifted_logits)
    steps = fast_step.HoleSteps(model, graphs=False)
    hidden = steps.run(state.context.layers, state.context, state.sequence()[start:end], start)
    masked = state.masked.nonzero().squeeze(-1) + state.hole_start
    rows = masked - (1 if model.family.shifted_logits else 0) - start
    return reference, hidden[rows]
