"""The bundled model (model/bundled): it loads by default, it has learnt something about code,
and it fills simple holes without crashing, with text that keeps the program valid Python.

It is a weak PREVIEW model (see its MODEL_CARD.md), so these tests check what it reliably
does, not that its completions are right; HumanEval-infilling measures that.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion_contract.options import InfillOptions
from model.decoding.sampler import infill
from model.network.loader import BUNDLED_DIR, bundled_model_path, load_model
from model.train.tokenizer import SPECIAL_TOKENS

pytestmark = pytest.mark.skipif(
    bundled_model_path() is None,
    reason=f"no bundled model in {BUNDLED_DIR} (export one: python -m model.train.export)")

MAX_WEIGHT_BYTES = 64 << 20  # what the repo can carry in git
# plain code the model was trained on the like of (not from the corpus itself)
CODE = '''import os


def read_lines(path):
    """Return the lines of a text file."""
    with open(path) as handle:
        return [line.rstrip("\\n") for line in handle]


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, amount=1):
        self.counts[key] = self.counts.get(key, 0) + amount
        return self.counts[key]


for index in range(10):
    if index % 2 == 0:
        print(index)
'''
# holes after `return`: the program compiles whatever expression, or nothing, fills them; it
# breaks when the model writes unbalanced brackets, a keyword or a second statement
RETURN_HOLES = [
    ("def add(a, b):\n    return ", "\n\n\nprint(add(1, 2))\n"),
    ("def is_even(n):\n    return ", "\n"),
    ("def last(items):\n    if not items:\n        return None\n    return ", "\n"),
]
MULTI_LINE_HOLES = [
    ("def mean(values):\n    total = sum(values)\n", "    return total / len(values)\n"),
    ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
     "\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n"),
]


@pytest.fixture(scope="module")
def bundled():
    return load_model(device="cpu", dtype="float32")


def test_bundled_model_is_the_default_and_small(bundled):
    assert bundled.path == BUNDLED_DIR and bundled.family.name == "default"
    assert sum(p.stat().st_size for p in BUNDLED_DIR.glob("*.safetensors")) < MAX_WEIGHT_BYTES
    config = json.loads((BUNDLED_DIR / "config.json").read_text())
    assert config["diffusion_lsp_family"] == "default" and config["is_causal"] is False
    assert "PREVIEW" in (BUNDLED_DIR / "MODEL_CARD.md").read_text()


def test_bundled_model_predicts_masked_code_far_better_than_chance(bundled):
    """A broken export (weights misnamed, lm_head untied, wrong tokenizer) scores about
    log(vocab) here; the trained model scores well below it."""
    ids = bundled.tokenizer.encode(CODE, add_special_tokens=False).ids
    clean = torch.tensor([[bundled.ids.bos, *ids, bundled.ids.eos]])  # (1, L)
    masked = torch.zeros_like(clean, dtype=torch.bool)
    masked[0, 1:-1] = torch.rand(len(ids), generator=torch.Generator().manual_seed(0)) < 0.15
    noised = clean.masked_fill(masked, bundled.ids.mask)
    with torch.no_grad():
        logits = bundled.network(input_ids=noised).logits  # (1, L, V)
    loss = torch.nn.functional.cross_entropy(logits[masked], clean[masked]).item()
    assert loss < math.log(bundled.vocab_size) - 2.0, loss


def compiles(program: str) -> bool:
    try:
        compile(program, "<hole>", "exec")
    except SyntaxError:
        return False
    return True


def test_single_line_holes_keep_the_program_valid(bundled):
    valid = 0
    for prefix, suffix in RETURN_HOLES:
        result = infill(bundled, prefix, suffix, InfillOptions(single_line=True, max_tokens=24))
        assert isinstance(result.text, str) and "\n" not in result.text
        assert not any(token in result.text for token in SPECIAL_TOKENS)
        assert 1 <= result.steps <= 24
        assert result.finish_reason in ("end", "newline", "max_tokens")
        valid += compiles(prefix + result.text + suffix)
    assert valid >= len(RETURN_HOLES) - 1  # one slip allowed: the model is a weak preview


@pytest.mark.parametrize("prefix,suffix", MULTI_LINE_HOLES)
def test_multi_line_holes_return_text(bundled, prefix, suffix):
    result = infill(bundled, prefix, suffix, InfillOptions(max_tokens=32))
    assert isinstance(result.text, str)
    assert 1 <= result.steps <= 32 and result.tokens <= 32
    # it may not compile (the model is weak), but no mask or end-of-hole token may leak out
    assert not any(token in result.text for token in SPECIAL_TOKENS)
