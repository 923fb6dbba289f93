"""`python -m benchmarks.packed_attention`: how a packed step's holes should attend, measured.

Each hole's window rows attend to its own context's keys and values and its own rows
(model/decoding/packed_step.py). Four ways to compute that for a batch, timed side by side on one
layer's attention of the 0.5B shape (14 query heads, 2 key/value heads, head_dim 64), in
rounds whose order rotates: one SDPA call a hole (`per_hole`, what packed_step does); one
SDPA over the holes padded to one batch with a padding mask (`padded`); one SDPA over all
rows packed with a block-diagonal mask (`block_mask`); FlexAttention with a document mask,
compiled (`flex`). Writes benchmarks/results/packed-attention.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.report import machine, save

HEADS, KV_HEADS, DIM = 14, 2, 64  # Qwen2.5-0.5B's attention
GROUP = HEADS // KV_HEADS
CASES = {  # name -> (context rows, window rows) per hole
    "4 holes of 65 rows": ([200, 260, 330, 400], [65] * 4),
    "4 holes, mixed windows": ([200, 260, 330, 400], [17, 65, 25, 65]),
    "16 holes of 65 rows": ([300] * 16, [65] * 16),
}
Holes = tuple[list[torch.Tensor], ...]


def make(contexts: list[int], widths: list[int]) -> Holes:
    """Per hole: queries (1, heads, W, D), context keys/values (1, kv, C, D), window
    keys/values (1, kv, W, D)."""
    return ([torch.randn(1, HEADS, w, DIM) for w in widths],
            [torch.randn(1, KV_HEADS, c, DIM) for c in contexts],
            [torch.randn(1, KV_HEADS, c, DIM) for c in contexts],
            [torch.randn(1, KV_HEADS, w, DIM) for w in widths],
            [torch.randn(1, KV_HEADS, w, DIM) for w in widths])


def per_hole(qs, ks, vs, wk, wv) -> torch.Tensor:  # noqa: ANN001 - Holes' parts
    outputs = []
    for q, k, v, a, b in zip(qs, ks, vs, wk, wv, strict=True):
        width = q.shape[2]
        out = F.scaled_dot_product_attention(q.reshape(1, KV_HEADS, GROUP * width, DIM),
                                             torch.cat([k, a], 2), torch.cat([v, b], 2))
        outputs.append(out.reshape(1, HEADS, width, DIM))
    return torch.cat(outputs, 2)


def padded(qs, ks, vs, wk, wv) -> torch.Tensor:  # noqa: ANN001
    batch, width = len(qs), max(q.shape[2] for q in qs)
    rows = max(k.shape[2] for k in ks)
    queries = torch.zeros(batch, HEADS, width, DIM)
    keys = torch.zeros(batch, KV_HEADS, rows + width, DIM)
    values = torch.zeros_like(keys)
    visible = torch.zeros(batch, rows + width, dtype=torch.bool)
    for i, (q, k, v, a, b) in enumerate(zip(qs, ks, vs, wk, wv, strict=True)):
        w, c = q.shape[2], k.shape[2]
        queries[i, :, :w], keys[i, :, :c], values[i, :, :c] = q[0], k[0], v[0]
        keys[i, :, rows:rows + w], values[i, :, rows:rows + w] = a[0], b[0]
        visible[i, :c] = visible[i, rows:rows + w] = True
    mask = torch.zeros(batch, 1, 1, rows + width).masked_fill(~visible[:, None, None],
                                                               float("-inf"))
    return F.scaled_dot_product_attention(queries.reshape(batch, KV_HEADS, GROUP * width, DIM),
                                          keys, values, attn_mask=mask)


def documents(qs, ks, wk) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The hole each packed query row and each packed key row belongs to."""
    queries = torch.cat([torch.full((q.shape[2],), i) for i, q in enumerate(qs)])
    keys = torch.cat([torch.full((k.shape[2] + a.shape[2],), i)
                      for i, (k, a) in enumerate(zip(ks, wk, strict=True))])
    return queries, keys


def packed(qs, ks, vs, wk, wv) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    return (torch.cat(qs, 2), torch.cat([t for pair in zip(ks, wk, strict=True) for t in pair], 2),
            torch.cat([t for pair in zip(vs, wv, strict=True) for t in pair], 2))


def block_mask(qs, ks, vs, wk, wv) -> torch.Tensor:  # noqa: ANN001
    queries, keys, values = packed(qs, ks, vs, wk, wv)
    rows, columns = queries.shape[2], keys.shape[2]
    query_doc, key_doc = documents(qs, ks, wk)
    mask = torch.zeros(rows, columns).masked_fill(query_doc[:, None] != key_doc[None],
                                                  float("-inf"))
    mask = mask[None].expand(GROUP, rows, columns).reshape(1, 1, GROUP * rows, columns)
    return F.scaled_dot_product_attention(
        queries.reshape(1, KV_HEADS, GROUP * rows, DIM), keys, values, attn_mask=mask)


def flex(holes: Holes) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    queries, keys, values = packed(*holes)
    query_doc, key_doc = documents(holes[0], holes[1], holes[3])

    def same_hole(batch, head, query, key):  # noqa: ANN001, ANN202 - FlexAttention's
        return query_doc[query] == key_doc[key]

    mask = create_block_mask(same_hole, None, None, queries.shape[2], keys.shape[2],
                             device="cpu")
    compiled = torch.compile(flex_attention)
    return lambda: compiled(queries, keys, values, block_mask=mask, enable_gqa=True)


def timed(run: Callable[[], object], repeats: int) -> float:
    """Median microseconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    for case, (contexts, widths) in CASES.items():
        holes = make(contexts, widths)
        runs = {"per_hole": lambda h=holes: per_hole(*h), "padded": lambda h=holes: padded(*h),
                "block_mask": lambda h=holes: block_mask(*h), "flex": flex(holes)}
        for run in runs.values():  # warm-up (and the compile)
            run()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds):
            names = list(runs)[round_ % len(runs):] + list(runs)[:round_ % len(runs)]
            for name in names:
                samples[name].append(timed(runs[name], 5))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        results[case] = {name: {"us": round(us), "over_per_hole": round(
            us / medians["per_hole"], 2)} for name, us in medians.items()}
        print(case, {name: f"{v['us']} us ({v['over_per_hole']}x)"
                     for name, v in results[case].items()}, flush=True)
    path = save("packed-attention", {"benchmark": "packed_attention", "machine": machine(),
                                     "shape": {"heads": HEADS, "kv_heads": KV_HEADS,
                                               "head_dim": DIM}, "cases": results})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
