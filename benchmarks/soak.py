"""A long day in one run: the real server over stdio, many requests with random edits and
cancels over many documents, its memory sampled as it goes.

    python -m benchmarks.soak [--requests 10000] [--documents 20] [--model PATH]

The documents are this repository's own Python files. Each step edits one document at random
(inserts words, newlines and non-ASCII text, deletes ranges), usually asks for an inline
completion near the edit (sometimes anywhere, sometimes past the end), and cancels some
requests at once, as an editor does while the user types; up to CONCURRENCY requests are in
flight. The server's RSS is read from /proc every SAMPLE_EVERY requests; growth is measured
from the end of the warm-up (caches and allocator pools fill first). Latency is from send to
answer, for requests that were not cancelled. Results: benchmarks/results/soak.json and
soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.report import REPO, machine, publish, pyplot, save, save_figure
from diffusion_contract.percentile import percentile

REQUESTS = 10_000
DOCUMENTS = 20
SAMPLE_EVERY = 500  # requests between two RSS samples
WARM_UP = 2_000  # requests before the baseline RSS sample
CONCURRENCY = 4  # requests in flight at most
CANCEL_SHARE = 0.3
EDIT_SHARE = 0.8
MAX_DOCUMENT_LINES = 400
GROWTH_GOAL = 0.05  # RSS growth after warm-up the server should stay under
CANCELLED = -32800  # LSP's RequestCancelled (ours, or superseded by a newer request)
WORDS = ("x", "(", ")", " ", "self.", "return ", "foo", "é", "λ", "😋", "\n", "    ", "\t",
         "# note\n", "def f(a, b):\n    ")
# short holes, a few tokens a step: the soak is about the server holding up, not the model;
# on the shared 2-core CPU the defaults would make 10,000 requests a matter of hours
SETTINGS = {"completion": {"debounceMs": 0, "maxTokens": 8, "maxTokensSingleLine": 8,
                           "tokensPerStep": 4},
            "context": {"prefixTokens": 192, "suffixTokens": 64}}
TINY_DIR = Path("/tmp/diffusion-lsp-soak-tiny")


@dataclass
class Tally:
    answered: int = 0
    with_items: int = 0
    cancelled: int = 0  # by us
    superseded: int = 0  # cancelled by the server for a newer request on the document
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


def utf16_units(text: str) -> int:
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def source_documents(count: int) -> list[tuple[str, str]]:
    """(uri, text) of `count` Python files of this repository, cut to MAX_DOCUMENT_LINES."""
    folders = ("lsp_server", "model", "benchmarks", "diffusion_lsp", "tests")
    files = sorted(path for folder in folders
                   for path in (REPO / folder).rglob("*.py") if path.stat().st_size > 2000)
    chosen = files[:count]
    return [(f"untitled:soak/{path.relative_to(REPO)}",
             "\n".join(path.read_text(encoding="utf-8").split("\n")[:MAX_DOCUMENT_LINES]))
            for path in chosen]


class Mirror:
    """The client's copy of one document, edited the way the server is told to."""

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")
        self.version = 1

    def random_point(self, rng: random.Random) -> tuple[int, int]:
        line = rng.randrange(len(self.lines))
        return line, rng.randrange(len(self.lines[line]) + 1)

    def edit(self, rng: random.Random):
        """A random edit, applied here; returns the LSP change and the cursor after it."""
        from lsprotocol import types

        start = self.random_point(rng)
        end = start
        if rng.random() < 0.25:  # delete (or replace) a short range on the same line
            end = (start[0], min(len(self.lines[start[0]]), start[1] + rng.randrange(1, 12)))
        text = "" if end != start and rng.random() < 0.5 else rng.choice(WORDS)
        change = types.TextDocumentContentChangePartial(
            range=types.Range(start=self.position(*start), end=self.position(*end)), text=text)
        line = self.lines[start[0]]
        self.lines[start[0]:start[0] + 1] = (line[:start[1]] + text + line[end[1]:]).split("\n")
        self.version += 1
        return change, after_edit(start, text)

    def position(self, line: int, column: int):
        from lsprotocol import types

        return types.Position(line=line, character=utf16_units(self.lines[line][:column]))


async def soak(requests: int, documents: int, model: str | None, seed: int,
               progress=None) -> dict:
    from lsprotocol import types
    from pygls.exceptions import JsonRpcException

    from benchmarks.lsp_client import open_document, plain, running_server, stats

    rng = random.Random(seed)
    if model == "tiny":
        from model.network.tiny import write_tiny_model

        model = str(write_tiny_model(TINY_DIR))
    settings = dict(SETTINGS, **({"model": {"path": model}} if model else {}))
    tally = Tally()
    samples: list[dict] = []
    async with running_server(settings) as client:
        pid = client._server.pid
        mirrors = {}
        for uri, text in source_documents(documents):
            open_document(client, uri, text)
            mirrors[uri] = Mirror(text)
        uris = list(mirrors)
        pending: set[asyncio.Task] = set()
        ours: set[str] = set()
        samples.append({"requests": 0, "rss_mb": rss_mb(pid)})
        began = time.perf_counter()

        async def one(msg_id: str, answer, sent: float) -> None:
            try:
                result = await answer
            except JsonRpcException as error:
                if error.code != CANCELLED:
                    tally.errors.append(f"{msg_id}: {error}")
                elif msg_id in ours:
                    tally.cancelled += 1
                else:
                    tally.superseded += 1
                return
            tally.answered += 1
            tally.with_items += bool(result and result.items)
            tally.latencies_ms.append((time.perf_counter() - sent) * 1e3)

        for index in range(requests):
            uri = rng.choice(uris)
            mirror = mirrors[uri]
            where = mirror.random_point(rng)
            if rng.random() < EDIT_SHARE:
                change, where = mirror.edit(rng)
                client.text_document_did_change(types.DidChangeTextDocumentParams(
                    text_document=types.VersionedTextDocumentIdentifier(
                        uri=uri, version=mirror.version), content_changes=[change]))
            roll = rng.random()
            if roll < 0.05:  # past the end: must get no items, never an error
                position = types.Position(line=len(mirror.lines) + 5, character=0)
            else:
                position = mirror.position(*where)
            msg_id = f"soak-{index}"
            params = types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri), position=position,
                context=types.InlineCompletionContext(
                    trigger_kind=types.InlineCompletionTriggerKind.Automatic))
            answer = asyncio.wrap_future(client.protocol.send_request(  # written now
                types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id))
            pending.add(asyncio.ensure_future(one(msg_id, answer, time.perf_counter())))
            if rng.random() < CANCEL_SHARE:
                ours.add(msg_id)
                client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
            if len(pending) >= CONCURRENCY:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if (index + 1) % SAMPLE_EVERY == 0:
                samples.append({"requests": index + 1, "rss_mb": rss_mb(pid),
                                "seconds": round(time.perf_counter() - began, 1)})
                print(f"{index + 1:>6} requests  rss {samples[-1]['rss_mb']:.1f} MB  "
                      f"{samples[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
                if progress is not None:  # what is known so far, should the run be stopped
                    progress(summarise(tally, samples, time.perf_counter() - began, {},
                                       index + 1, documents, model, seed))
        if pending:
            await asyncio.wait(pending)
        elapsed = time.perf_counter() - began
        server_stats = plain(await stats(client))
    return summarise(tally, samples, elapsed, server_stats, requests, documents, model, seed)


def after_edit(start: tuple[int, int], text: str) -> tuple[int, int]:
    """Where the cursor is after typing `text` at `start`."""
    parts = text.split("\n")
    if len(parts) == 1:
        return start[0], start[1] + len(text)
    return start[0] + len(parts) - 1, len(parts[-1])


def summarise(tally: Tally, samples: list[dict], elapsed: float, server_stats: dict,
              requests: int, documents: int, model: str | None, seed: int) -> dict:
    baseline = next((s for s in samples if s["requests"] >= WARM_UP), samples[0])
    final = samples[-1]
    growth = (final["rss_mb"] - baseline["rss_mb"]) / baseline["rss_mb"]
    latencies = tally.latencies_ms or [0.0]
    return {
        "requests": requests, "documents": documents, "seed": seed,
        "model": model or "bundled", "seconds": round(elapsed, 1),
        "answered": tally.answered, "with_items": tally.with_items,
        "cancelled": tally.cancelled, "superseded": tally.superseded,
        "errors": len(tally.errors), "error_samples": tally.errors[:5],
        "latency_ms": {"p50": round(percentile(latencies, 50), 1),
                       "p95": round(percentile(latencies, 95), 1),
                       "max": round(max(latencies), 1)},
        "rss_mb": {"start": round(samples[0]["rss_mb"], 1),
                   "after_warm_up": round(baseline["rss_mb"], 1),
                   "end": round(final["rss_mb"], 1),
                   "max": round(max(s["rss_mb"] for s in samples), 1),
                   "growth_after_warm_up": round(growth, 4),
                   "goal": GROWTH_GOAL, "warm_up_requests": WARM_UP},
        "samples": samples, "server": server_stats, "machine": machine(),
        "latencies_ms": [round(value, 1) for value in tally.latencies_ms],
    }


def plot(result: dict, name: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (memory, latency) = plt.subplots(1, 2, figsize=(11, 4))
    samples = result["samples"]
    memory.plot([s["requests"] for s in samples], [s["rss_mb"] for s in samples], marker="o")
    memory.axvline(result["rss_mb"]["warm_up_requests"], color="grey", linestyle=":",
                   label="end of warm-up")
    memory.set_xlabel("requests")
    memory.set_ylabel("server RSS (MB)")
    memory.set_title(f"memory: {result['rss_mb']['growth_after_warm_up']:+.1%} after warm-up")
    memory.legend()
    values = sorted(result["latencies_ms"])
    latency.plot(values, [i / len(values) for i in range(len(values))])
    latency.set_xscale("log")
    latency.set_xlabel("latency, send to answer (ms)")
    latency.set_ylabel("fraction of answered requests")
    latency.set_title(f"p50 {result['latency_ms']['p50']} ms, p95 {result['latency_ms']['p95']} ms")
    return save_figure(plt, fig, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--documents", type=int, default=DOCUMENTS)
    parser.add_argument("--model", default=None,
                        help="model directory, or `tiny` for a tiny random-weight model "
                             "(default: the bundled model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="soak", help="result file name (no extension)")
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args.requests, args.documents, args.model, args.seed,
                              lambda partial: save(f"{args.name}-partial", partial)))
    shown = {key: result[key] for key in ("requests", "seconds", "answered", "cancelled",
                                          "superseded", "errors", "latency_ms", "rss_mb")}
    print(shown)
    path = publish(args.name, result, lambda: plot(result, args.name))
    (path.parent / f"{args.name}-partial.json").unlink(missing_ok=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
