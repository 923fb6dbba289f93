"""Byte-level BPE tokenizers for code, built with HF `tokenizers`.

Newlines are split off before the byte-level pre-tokenizer, so a line-shaped hole always
starts and ends on a token boundary (a plain byte-level BPE glues "\n" to the indentation
after it, which makes "complete this line" impossible to express in tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)


def code_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; special tokens get the first ids, in order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = code_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Checkpoints that ship their BPE as vocab.json + merges.txt (no tokenizer.json)

BPE_VOCAB_FILE = "vocab.json"
BPE_MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"  # {"<|token|>": id}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # "added_tokens_decoder": {id: {content, special}}


def qwen2_tokenizer_from_bpe_files(directory: Path) -> Tokenizer:
    """Qwen2's byte-level BPE from vocab.json + merges.txt + added tokens, as one Tokenizer.

    Dream-Coder, DiffuCoder and DreamOn publish their (Qwen2.5) tokenizer this way, for a
    `trust_remote_code` tokenizer class. The pipeline is the one transformers' Qwen2Tokenizer
    builds (NFC, Qwen2's split regex, byte-level without prefix space); added tokens keep the
    ids the checkpoint gives them, special ones stay whole and are marked special.
    """
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE.from_file(str(directory / BPE_VOCAB_FILE),
                                               str(directory / BPE_MERGES_FILE)))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    for token_id, (content, special) in sorted(_added_tokens(directory).items()):
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        if tokenizer.token_to_id(content) != token_id:
            raise ValueError(f"added token {content!r} in {directory} should have id {token_id} "
                             f"but got {tokenizer.token_to_id(content)} (ids not contiguous?)")
    return tokenizer


def _added_tokens(directory: Path) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) from tokenizer_config.json's added_tokens_decoder and
    added_tokens.json (the latter does not say which are special: they count as special)."""
    added: dict[int, tuple[str, bool]] = {}
    listed = directory / ADDED_TOKENS_FILE
    if listed.exists():
        for content, token_id in json.loads(listed.read_text()).items():
            added[int(token_id)] = (content, True)
    config = directory / TOKENIZER_CONFIG_FILE
    if config.exists():
        decoder = json.loads(config.read_text()).get("added_tokens_decoder") or {}
        for token_id, entry in decoder.items():
            added[int(token_id)] = (entry["content"], bool(entry.get("special", True)))
    return added
