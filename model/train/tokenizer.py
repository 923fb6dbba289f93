"""Train the bundled model's tokenizer on a corpus written by `model.train.corpus`.

Byte-level BPE with newlines split off (`model.network.tokenizer.train_tokenizer`), the `default`
family's special tokens first, in the order `<|bos|>, <|eos|>, <|mask|>, <|endofhole|>,
<|file_sep|>`.

`python -m model.train.tokenizer --corpus runs/corpus --out runs/tokenizer.json --vocab 8192`
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer

from model.network.tiny import FAMILY_SPECIAL_TOKENS
from model.network.tokenizer import train_tokenizer
from model.train.corpus import read_split

SPECIAL_TOKENS = FAMILY_SPECIAL_TOKENS["default"]
DEFAULT_VOCAB = 8192
DEFAULT_SAMPLE_MB = 40.0  # BPE merges settle long before the whole corpus is read


def sample_texts(corpus: Path, max_bytes: int) -> Iterator[str]:
    """Training texts of `corpus`, in order, until about `max_bytes` have been read."""
    total = 0
    for text in read_split(corpus, "train"):
        if total >= max_bytes:
            return
        total += len(text)
        yield text


def build_tokenizer(corpus: Path, vocab_size: int = DEFAULT_VOCAB,
                    sample_mb: float = DEFAULT_SAMPLE_MB, min_frequency: int = 2) -> Tokenizer:
    texts = sample_texts(corpus, int(sample_mb * 1e6))
    tokenizer = train_tokenizer(texts, vocab_size, list(SPECIAL_TOKENS), min_frequency)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, token
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="tokenizer.json to write")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    parser.add_argument("--sample-mb", type=float, default=DEFAULT_SAMPLE_MB)
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(args.corpus, args.vocab, args.sample_mb)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    sample = "\n".join(itertools.islice(read_split(args.corpus, "validation"), 50))
    ids = tokenizer.encode(sample).ids
    print(f"vocab {tokenizer.get_vocab_size()}, {len(sample) / max(len(ids), 1):.2f} chars/token "
          f"on validation, saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
