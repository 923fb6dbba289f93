"""Helpers more than one test file uses (test files never import each other)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
