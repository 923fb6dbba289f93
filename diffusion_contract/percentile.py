"""One percentile for the whole project: the benchmarks' figures, the language server's
`diffusion/stats` and the service's /metrics all mean the same thing by "p95".

Torch-free and import-free, so that any layer may use it (it sits under `model/` only because
that is the lowest package every other one already imports).
"""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values`, by nearest rank: the sorted value at
    index round(q / 100 * (n - 1)), so p0 is the minimum, p100 the maximum and p50 of an odd
    count the median. Raises ValueError when there are no values or q is out of range."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], not {q}")
    return ordered[round(q / 100 * (len(ordered) - 1))]
