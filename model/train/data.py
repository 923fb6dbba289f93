"""Training examples for masked-diffusion infilling, laid out exactly as at inference.

The corpus is tokenized once into one flat stream of token ids per split (files joined by
`<|file_sep|>`). An example is a window of that stream with a hole cut out of it:

    <|bos|> prefix hole(n) suffix <|eos|>        (always seq_len tokens)

where the hole holds the missing text followed by `<|endofhole|>` padding up to n tokens, so
the model learns that "the text is shorter than the hole" (the variable-length rule of the
sampler, after DreamOn, Wu et al., 2025). The hole is one line, several lines, the rest of a
line, or a random span. A share of examples have no hole: plain masked diffusion over the
whole window (MDLM, Sahoo et al., 2024), so that the model also learns code in general.
Masking (which hole positions become `<|mask|>`) is drawn later, per batch, in `train.py`.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

KINDS = ("line", "lines", "line-rest", "span", "plain")
DEFAULT_KIND_WEIGHTS = (0.35, 0.2, 0.1, 0.15, 0.2)
STREAM_DTYPE = np.uint16  # vocabularies here stay below 65,536
ENCODE_BATCH = 256  # files per tokenizer.encode_batch call


@dataclass(frozen=True)
class LayoutIds:
    """The special token ids an example needs (from the tokenizer, never inline)."""

    bos: int
    eos: int
    mask: int
    end_of_hole: int
    file_sep: int
    newline: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> LayoutIds:
        def need(token: str) -> int:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer lacks {token!r}")
            return token_id

        newline = tokenizer.encode("\n", add_special_tokens=False).ids
        if len(newline) != 1:
            raise ValueError("the tokenizer must keep '\\n' as one token (split newlines off)")
        return cls(bos=need("<|bos|>"), eos=need("<|eos|>"), mask=need("<|mask|>"),
                   end_of_hole=need("<|endofhole|>"), file_sep=need("<|file_sep|>"),
                   newline=newline[0])


@dataclass(frozen=True)
class ExampleShape:
    seq_len: int = 256  # every example is exactly this many tokens
    max_hole: int = 64  # real tokens in a hole, at most
    max_extra: int = 24  # end-of-hole padding after the hole's text: 0..max_extra tokens
    max_lines: int = 8  # a multi-line hole spans 2..max_lines lines
    kind_weights: tuple[float, ...] = DEFAULT_KIND_WEIGHTS  # in the order of KINDS


# ---------------------------------------------------------------------------------------------
# Token streams


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids followed by <|file_sep|>."""
    file_sep = tokenizer.token_to_id("<|file_sep|>")
    return [np.asarray([*encoding.ids, file_sep], dtype=STREAM_DTYPE)
            for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


_WORKER: dict[str, Tokenizer] = {}  # the tokenizer of a worker process (`workers` > 1)


def _start_worker(tokenizer_json: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER["tokenizer"] = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return encode_texts(_WORKER["tokenizer"], texts)


def tokenize_split(corpus: Path, split: str, tokenizer: Tokenizer, out: Path,
                   max_tokens: int | None = None, workers: int = 1) -> Path:
    """Tokenize one split into `out` (flat uint16 ids, files joined by <|file_sep|>).

    Files are taken in the order of their content hash, a deterministic shuffle, so that a
    `max_tokens` budget samples every package rather than the first ones alphabetically.
    With `workers` > 1, that many processes encode; the stream is the same.
    """
    if tokenizer.get_vocab_size() > np.iinfo(STREAM_DTYPE).max:
        raise ValueError("vocabulary too large for a uint16 stream")
    records = []
    with (Path(corpus) / f"{split}.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            records.append((record["sha256"], record["text"]))
    records.sort()
    batches = [[text for _, text in records[start:start + ENCODE_BATCH]]
               for start in range(0, len(records), ENCODE_BATCH)]
    pool = (ProcessPoolExecutor(workers, initializer=_start_worker,
                                initargs=(tokenizer.to_str(),)) if workers > 1 else None)
    encoded = (pool.map(_encode_in_worker, batches) if pool
               else (encode_texts(tokenizer, texts) for texts in batches))
    chunks, total = [], 0
    for ids in encoded:
        chunks.extend(ids)
        total += sum(len(x) for x in ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if pool:
        pool.shutdown(cancel_futures=True)
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=STREAM_DTYPE)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    out.parent.mkdir(parents=True, exist_ok=True)
    stream.tofile(out)
    return out


def load_stream(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=STREAM_DTYPE)





# ---------------------------------------------------------------------------------------------
# One example


@dataclass
class Example:
    input_ids: np.ndarray  # (L,) the clean sequence: bos, prefix, hole text, padding, suffix, eos
    eligible: np.ndarray  # (L,) bool: positions that may be masked (and are scored when masked)
    kind: str


def _line_bounds(window: np.ndarray, newline: int) -> list[tuple[int, int]]:
    """[start, end) of every complete line in `window` (end includes its newline)."""
    ends = np.flatnonzero(window == newline)
    return [(int(a) + 1, int(b) + 1) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def _choose_hole(window: np.ndarray, kind: str, shape: ExampleShape, ids: LayoutIds,
                 rng: np.random.Generator) -> tuple[int, int] | None:
    """[a, b) of the hole inside `window` for a hole-shaped `kind`, or None if none fits."""
    if kind == "span":
        length = int(rng.integers(1, shape.max_hole + 1))
        length = min(length, len(window) - 2)
        start = int(rng.integers(1, len(window) - length))
        return start, start + length
    lines = [(a, b) for a, b in _line_bounds(window, ids.newline) if b - a <= shape.max_hole]
    if not lines:
        return None
    if kind == "line":
        return lines[int(rng.integers(len(lines)))]
    if kind == "line-rest":
        a, b = lines[int(rng.integers(len(lines)))]
        return int(rng.integers(a, b)), b
    if kind == "lines":
        bounds = _line_bounds(window, ids.newline)
        first = int(rng.integers(len(bounds)))
        count = int(rng.integers(2, shape.max_lines + 1))
        a = bounds[first][0]
        b = a
        for _, end in bounds[first:first + count]:
            if end - a > shape.max_hole:
                break
            b = end
        return (a, b) if b > a else None
    raise ValueError(f"unknown hole kind {kind!r}; known: {', '.join(KINDS)}")


def make_example(stream: np.ndarray, shape: ExampleShape, ids: LayoutIds,
                 rng: np.random.Generator, kind: str | None = None) -> Example:
    """One training example of exactly `shape.seq_len` tokens, from a random window."""
    if kind is None:
        weights = np.asarray(shape.kind_weights, dtype=float)
        kind = KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]
    length = shape.seq_len
    extra = 0 if kind == "plain" else int(rng.integers(0, shape.max_extra + 1))
    text_len = length - 2 - extra
    if len(stream) <= text_len:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than one example")
    start = int(rng.integers(0, len(stream) - text_len))
    window = stream[start:start + text_len].astype(np.int64)
    hole = None if kind == "plain" else _choose_hole(window, kind, shape, ids, rng)
    if hole is None:  # no line fits in this window: a plain example instead
        kind, extra = "plain", 0
        window = stream[start:start + length - 2].astype(np.int64)
        sequence = np.concatenate([[ids.bos], window, [ids.eos]])
        eligible = np.ones(length, dtype=bool)
        eligible[[0, -1]] = False
        return Example(sequence, eligible, kind)
    a, b = hole
    padding = np.full(extra, ids.end_of_hole, dtype=np.int64)
    sequence = np.concatenate([[ids.bos], window[:a], window[a:b], padding, window[b:],
                               [ids.eos]])
    eligible = np.zeros(length, dtype=bool)
    eligible[1 + a:1 + b + extra] = True
    return Example(sequence, eligible, kind)


def make_batch(stream: np.ndarray, batch_size: int, shape: ExampleShape, ids: LayoutIds,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) clean ids and (B, L) eligible-for-masking flags."""
    examples = [make_example(stream, shape, ids, rng) for _ in range(batch_size)]
    return (np.stack([e.input_ids for e in examples]),
            np.stack([e.eligible for e in examples]))


def main(argv: list[str] | None = None) -> int:
    """`python -m model.train.data --corpus runs/corpus --tokenizer runs/tokenizer.json
    --out runs/data [--max-train-tokens N] [--workers N]`: write train.bin and validation.bin."""
    import argparse

    parser = argparse.ArgumentParser(description="tokenize a corpus into token streams")
    parser.add_argument("--corpus", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-train-tokens", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    for split, budget in (("train", args.max_train_tokens), ("validation", None)):
        path = tokenize_split(args.corpus, split, tokenizer, args.out / f"{split}.bin", budget,
                              args.workers)
        print(f"{split}: {len(load_stream(path)):,} tokens -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
