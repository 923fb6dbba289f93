"""Checkpoints whose tokenizer is vocab.json + merges.txt + added tokens (Dream-Coder, DiffuCoder,
DreamOn publish it so, with no tokenizer.json): the loader builds the same tokenizer as
transformers' Qwen2Tokenizer does from those files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.network.loader import load_model
from model.network.tiny import SAMPLE_CODE
from model.network.tokenizer import qwen2_tokenizer_from_bpe_files, train_tokenizer
from tests.helpers import split_tokenizer_json

SAMPLE = ("def f(x):\n    return x + 12345  # it's ünïcode\n"
          "<|im_start|>user<|mask|><tool_call>\n\tpass\r\n")


@pytest.fixture
def qwen2_style_files(tmp_path) -> Path:
    """A tiny Qwen2-style BPE: plain vocab, then added tokens after it, one of them not
    special (as Qwen2.5's <tool_call>)."""
    tokenizer = train_tokenizer([SAMPLE_CODE] * 4, 300, [], min_frequency=1)
    tokenizer.model.save(str(tmp_path))
    size = tokenizer.get_vocab_size()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    added = {t: size + i for i, t in enumerate([*specials, "<tool_call>"])}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    decoder = {str(i): {"content": t, "special": t in specials} for t, i in added.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "tokenizer_class": "Qwen2Tokenizer"}))
    return tmp_path


def test_same_ids_as_transformers_qwen2_tokenizer(qwen2_style_files):
    from transformers import Qwen2Tokenizer

    reference = Qwen2Tokenizer.from_pretrained(str(qwen2_style_files))
    ours = qwen2_tokenizer_from_bpe_files(qwen2_style_files)

    assert ours.encode(SAMPLE).ids == reference(SAMPLE)["input_ids"]
    assert ours.token_to_id("<|mask|>") == reference.convert_tokens_to_ids("<|mask|>")
    assert ours.decode(ours.encode(SAMPLE).ids, skip_special_tokens=False) == SAMPLE


def test_added_token_ids_that_do_not_follow_the_vocab_are_refused(qwen2_style_files):
    (qwen2_style_files / "tokenizer_config.json").unlink()
    (qwen2_style_files / "added_tokens.json").write_text(json.dumps({"<|mask|>": 99_999}))
    with pytest.raises(ValueError, match="99999"):
        qwen2_tokenizer_from_bpe_files(qwen2_style_files)


def test_a_checkpoint_without_tokenizer_json_loads(tiny_dirs, tiny_models, tmp_path):
    directory = tmp_path / "dream-bpe-files"
    shutil.copytree(tiny_dirs["dream"], directory)
    split_tokenizer_json(directory)

    from transformers import Qwen2Tokenizer

    model = load_model(directory, device="cpu")

    assert model.ids == tiny_models["dream"].ids  # mask, end, bos: same ids as before
    reference = Qwen2Tokenizer.from_pretrained(str(directory))
    assert model.tokenizer.encode(SAMPLE_CODE).ids == reference(SAMPLE_CODE)["input_ids"]
    assert model.tokenizer.decode(model.tokenizer.encode(SAMPLE_CODE).ids) == SAMPLE_CODE
