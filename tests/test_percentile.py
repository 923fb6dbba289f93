"""One percentile: the benchmarks, `diffusion/stats` and the service's metrics agree."""

from __future__ import annotations

import pytest

from diffusion_contract.percentile import percentile
from lsp_server.stats import percentiles


def test_nearest_rank_on_sorted_values():
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted on purpose
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 100.0
    assert percentile(values, 95) == 95.0  # index round(0.95 * 99) = 94 of 1..100
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # the median of an odd count
    assert percentile([7.0], 99) == 7.0


def test_no_values_or_a_q_out_of_range_is_refused():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0, 100"):
        percentile([1.0], 0.95 * 1000)


def test_the_server_and_the_service_report_the_same_percentiles():
    from diffusion_lsp.service import quantile

    values = [float(v) for v in (5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 30, 20)]
    server = percentiles(values)
    assert server["count"] == 12
    for q in (50, 95, 99):
        assert server[f"p{q}"] == percentile(values, q) == quantile(values, q / 100)
    assert percentiles([]) == {"count": 0, "p50": None, "p95": None, "p99": None}
    assert quantile([], 0.5) == 0.0
