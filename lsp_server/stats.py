"""Counters and latency percentiles for `diffusion/stats` (bounded memory)."""

from __future__ import annotations

from collections import Counter, deque

from diffusion_contract.percentile import percentile

WINDOW = 1000  # latencies kept for the percentiles


def percentiles(values: list[float] | deque) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p95": None, "p99": None}

    return {"count": len(ordered), **{f"p{q}": round(percentile(ordered, q), 2)
                                       for q in (50, 95, 99)}}


class Stats:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.latency_ms: deque[float] = deque(maxlen=WINDOW)
        self.model_ms: deque[float] = deque(maxlen=WINDOW)
        self.steps: deque[int] = deque(maxlen=WINDOW)
        self.next_edit_ms: deque[float] = deque(maxlen=WINDOW)

    def count(self, name: str, by: int = 1) -> None:
        self.counts[name] += by

    def record(self, latency_ms: float, model_ms: float | None = None,
               steps: int | None = None) -> None:
        self.latency_ms.append(latency_ms)
        if model_ms is not None:
            self.model_ms.append(model_ms)
        if steps is not None:
            self.steps.append(steps)

    def snapshot(self) -> dict:
        names = ("requests", "completed", "empty", "cancelled", "superseded", "cacheHits",
                 "errors", "notReady", "rejected", "busy")
        snapshot = {name: self.counts.get(name, 0) for name in names}
        snapshot["suppressed"] = {  # completions and hole fills not offered, and why
            "lowConfidence": self.counts.get("suppressed:low_confidence", 0),
            "breaksParse": self.counts.get("suppressed:breaks_parse", 0)}
        snapshot["latencyMs"] = percentiles(self.latency_ms)
        snapshot["modelMs"] = percentiles(self.model_ms)
        snapshot["nextEdit"] = {
            "requests": self.counts.get("nextEditRequests", 0),
            "suggested": self.counts.get("nextEdits", 0),
            "empty": self.counts.get("nextEditsEmpty", 0),
            "stale": self.counts.get("nextEditStale", 0),
            "skipped": self.counts.get("nextEditSkipped", 0),  # backed off (no edits lately)
            "latencyMs": percentiles(self.next_edit_ms)}
        snapshot["meanSteps"] = (round(sum(self.steps) / len(self.steps), 2)
                                 if self.steps else None)
        return snapshot
