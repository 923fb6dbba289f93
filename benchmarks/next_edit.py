"""`diffusion-lsp bench next-edit`: does the server predict the edit the user makes next?

The edit set is built from real Python on this machine (the standard library of the Python
running the bench), three kinds of case, each a document, the user's edit, and the document
the user would end with:

- `rename`: a function's parameter renamed in its signature; its uses in the body follow.
- `add-parameter`: a parameter added to a function and to one call of it; the other call
  (found in the same file, moved below the function) follows.
- `signature`: a function renamed in its `def`; its calls (from the same file) follow.

Each case runs through a real LSP client against `diffusion-lsp serve` exactly as an editor
would: open the document before the edit, send the edit as `didChange`, ask
`textDocument/copilotInlineEdit` at the end of the edit, apply every edit returned. Reported:
exact match of the predicted document, whether anything was suggested, and latency p50/p95,
for the local model (each rewrite strategy) and for a remote: a stand-in of Inception's edit
endpoint that answers the expected region (an oracle: it measures the protocol, the prompt and
mapping the answer back, not a model), or a real one with `--remote-url` (the key in
DIFFUSION_LSP_TOKEN).
"""

from __future__ import annotations

import ast
import asyncio
import os
import random
import re
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.report import machine, publish
from diffusion_contract.percentile import percentile

KINDS = ("rename", "add-parameter", "signature")
MAX_BODY_LINES = 8  # the function's lines kept (the editable region is 13 lines)
NEW_NAMES = ("value", "item", "count", "target", "data")


@dataclass(frozen=True)
class Case:
    kind: str
    source: str  # where it came from: file:line
    before: str  # the document before the user's edit
    edited: str  # after it
    expected: str  # after the edit the user makes next
    line: int  # the cursor, at the end of the user's edit
    character: int


def _functions(tree: ast.AST) -> list[ast.FunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and node.end_lineno is not None and not node.decorator_list]


def _head(lines: list[str], node: ast.FunctionDef) -> list[str] | None:
    """The function's first lines (a one-line signature, at most MAX_BODY_LINES), dedented."""
    start = node.lineno - 1
    end = min(node.end_lineno or start + 1, start + MAX_BODY_LINES)
    chunk = lines[start:end]
    if not chunk[0].rstrip().endswith(":"):
        return None
    indent = len(chunk[0]) - len(chunk[0].lstrip())
    if any(line.strip() and len(line) - len(line.lstrip()) < indent for line in chunk):
        return None
    return [line[indent:] for line in chunk]


def _word(name: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z0-9_.]){re.escape(name)}(?![A-Za-z0-9_])")


def rename_case(path: str, node: ast.FunctionDef, lines: list[str], rng: random.Random
                ) -> Case | None:
    head = _head(lines, node)
    if head is None:
        return None
    arguments = [a.arg for a in node.args.args if a.arg not in ("self", "cls")]
    for name in arguments:
        body = "\n".join(head[1:])
        if (len(name) < 3 or len(_word(name).findall(body)) < 2
                or any(mark in body for mark in ('"', "'", "#"))):  # code only
            continue
        new = rng.choice([n for n in NEW_NAMES if n not in "\n".join(head)] or ["renamed"])
        signature = head[0]
        match = _word(name).search(signature)
        if match is None:
            continue
        before = "\n".join(head) + "\n"
        edited_signature = signature[:match.start()] + new + signature[match.end():]
        edited = "\n".join([edited_signature, *head[1:]]) + "\n"
        expected = "\n".join([edited_signature, *(_word(name).sub(new, line)
                                                  for line in head[1:])]) + "\n"
        return Case("rename", f"{path}:{node.lineno}", before, edited, expected, 0,
                    match.start() + len(new))
    return None


def _calls(lines: list[str], name: str) -> list[str]:
    pattern = re.compile(rf"(?<![A-Za-z0-9_.]){re.escape(name)}\(([^()]*)\)")
    found = []
    for line in lines:
        stripped = line.strip()
        if (pattern.search(stripped) and not stripped.startswith(("def ", "#", "return"))
                and stripped.count("(") == stripped.count(")") and len(stripped) < 70
                and '"' not in stripped and "'" not in stripped):
            found.append(stripped)
    return list(dict.fromkeys(found))


def signature_case(path: str, node: ast.FunctionDef, lines: list[str], rng: random.Random
                   ) -> Case | None:
    head = _head(lines, node)
    calls = _calls(lines, node.name)
    if head is None or not calls or len(head) > 6:
        return None
    new = node.name + "_" + rng.choice(("v2", "new", "impl"))
    before = "\n".join(head) + "\n\n" + calls[0] + "\n"
    edited = before.replace(f"def {node.name}(", f"def {new}(", 1)
    expected = edited.replace(calls[0], _word(node.name).sub(new, calls[0]))
    return Case("signature", f"{path}:{node.lineno}", before, edited, expected, 0,
                len(f"def {new}"))


def add_parameter_case(path: str, node: ast.FunctionDef, lines: list[str], rng: random.Random
                       ) -> Case | None:
    head = _head(lines, node)
    calls = [c for c in _calls(lines, node.name) if re.search(rf"{node.name}\([^()]+\)", c)]
    if head is None or len(calls) < 2 or len(head) > 5 or "*" in head[0]:
        return None
    parameter = rng.choice(("strict", "timeout", "verbose"))
    if parameter in "\n".join([*head, *calls]):
        return None
    signature = head[0]
    close = signature.rfind(")")
    if close < 0 or signature[close - 1] == "(":
        return None

    def with_argument(call: str) -> str:
        match = re.search(rf"{re.escape(node.name)}\(([^()]*)\)", call)
        assert match is not None
        return call[:match.end() - 1] + f", {parameter}" + call[match.end() - 1:]

    new_signature = signature[:close] + f", {parameter}" + signature[close:]
    before = "\n".join(head) + "\n\n" + calls[0] + "\n" + calls[1] + "\n"
    edited = "\n".join([new_signature, *head[1:]]) + "\n\n" + with_argument(calls[0]) + "\n" + (
        calls[1] + "\n")
    expected = "\n".join([new_signature, *head[1:]]) + "\n\n" + with_argument(calls[0]) + (
        "\n" + with_argument(calls[1]) + "\n")
    row = len(head) + 1
    return Case("add-parameter", f"{path}:{node.lineno}", before, edited, expected, row,
                len(with_argument(calls[0])) - 1)


def build_cases(per_kind: int, seed: int = 0, root: Path | None = None) -> list[Case]:
    """Up to `per_kind` cases of each kind from the Python files under `root` (default: this
    Python's standard library), deterministic for a seed."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size < 200_000)
    rng.shuffle(files)
    makers = {"rename": rename_case, "add-parameter": add_parameter_case,
              "signature": signature_case}
    found: dict[str, list[Case]] = {kind: [] for kind in KINDS}
    for path in files:
        if all(len(cases) >= per_kind for cases in found.values()):
            break
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.split("\n")
        for node in _functions(tree):
            for kind, make in makers.items():
                if len(found[kind]) >= per_kind:
                    continue
                case = make(path.name, node, lines, rng)
                if case is not None and case.edited != case.expected:
                    found[kind].append(case)
                    break
    return [case for kind in KINDS for case in found[kind]]


def applied(text: str, edits: list[dict]) -> str:
    """`text` with LSP edits (ASCII, "\\n" line ends) applied."""
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)

    def at(position: dict) -> int:
        return min(starts[position["line"]] + position["character"], len(text))

    for item in sorted(edits, key=lambda e: at(e["range"]["start"]), reverse=True):
        text = text[:at(item["range"]["start"])] + item["text"] + text[at(item["range"]["end"]):]
    return text


def edit_params(before: str, edited: str) -> dict:
    """One didChange replacing the changed lines of `before` with those of `edited`."""
    a, b = before.split("\n"), edited.split("\n")
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return {"start": head, "end": len(a) - tail, "text": "".join(
        line + "\n" for line in b[head:len(b) - tail])}


async def run_cases(cases: list[Case], settings: dict, label: str) -> dict:
    from lsprotocol import types

    from benchmarks.lsp_client import open_document, plain, running_server

    rows = []
    async with running_server(settings) as client:
        for index, case in enumerate(cases):
            uri = f"untitled:case{index}.py"
            open_document(client, uri, case.before)
            change = edit_params(case.before, case.edited)
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
                content_changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(start=types.Position(line=change["start"], character=0),
                                      end=types.Position(line=change["end"], character=0)),
                    text=change["text"])]))
            began = time.perf_counter()
            result = plain(await client.protocol.send_request_async(
                "textDocument/copilotInlineEdit",
                {"textDocument": {"uri": uri, "version": 2},
                 "position": {"line": case.line, "character": case.character}}))
            latency = (time.perf_counter() - began) * 1e3
            predicted = applied(case.edited, result["edits"])
            rows.append({"kind": case.kind, "source": case.source, "latency_ms": latency,
                         "suggested": bool(result["edits"]),
                         "exact": predicted == case.expected})
            client.text_document_did_close(types.DidCloseTextDocumentParams(
                text_document=types.TextDocumentIdentifier(uri=uri)))
    return summarize(label, rows)


def summarize(label: str, rows: list[dict]) -> dict:
    def stats(subset: list[dict]) -> dict:
        latencies = [r["latency_ms"] for r in subset]
        return {"cases": len(subset),
                "exact_match": round(sum(r["exact"] for r in subset) / len(subset), 3),
                "suggested": round(sum(r["suggested"] for r in subset) / len(subset), 3),
                "p50_ms": round(percentile(latencies, 50), 1),
                "p95_ms": round(percentile(latencies, 95), 1)} if subset else {"cases": 0}

    return {"label": label, "all": stats(rows),
            "by_kind": {kind: stats([r for r in rows if r["kind"] == kind]) for kind in KINDS},
            "rows": rows}


def oracle(cases: list[Case]):
    """A rewrite for the edit stand-in: the expected region of the case whose edited
    document the prompt shows (the region unchanged when the prompt matches none)."""
    from lsp_server.next_edit import region_edits

    by_text = {case.edited: case for case in cases}

    def rewrite(prompt):
        case = by_text.get(prompt.text)
        if case is None:
            return prompt.region
        changes = region_edits(prompt.text, case.expected)
        start, end = len(prompt.above), len(prompt.above) + len(prompt.region)
        region = prompt.region
        for change in sorted(changes, key=lambda c: c.start, reverse=True):
            if start <= change.start and change.end <= end:
                region = (region[:change.start - start] + change.text
                          + region[change.end - start:])
        return region

    return rewrite


async def bench(args) -> dict:
    cases = build_cases(args.limit, seed=0)
    print(f"{len(cases)} cases from {sysconfig.get_paths()['stdlib']}: "
          + ", ".join(f"{kind} {sum(c.kind == kind for c in cases)}" for kind in KINDS))
    results = []
    base = {"completion": {"debounceMs": 0}}
    if args.model:
        base["model"] = {"path": args.model}
    strategies = [args.strategy] if args.strategy else ["doubt", "region"]
    if not args.remote_only:
        for strategy in strategies:
            settings = {**base, "nextEdit": {"strategy": strategy, "backoff": False}}
            results.append(await run_cases(cases, settings, f"local ({strategy})"))
    if args.remote_url:
        settings = {"backend": "remote", "completion": {"debounceMs": 0},
                    "nextEdit": {"backoff": False},
                    "remote": {"url": args.remote_url, "api": "mercury", "timeoutMs": 10000}}
        results.append(await run_cases(cases, settings, f"remote {args.remote_url}"))
    else:
        from tests.edit_standin import EditStandIn  # the test suite's Mercury stand-in
        from tests.remote_standin import KEY

        async with EditStandIn(rewrite=oracle(cases)) as standin:
            settings = {"backend": "remote", "completion": {"debounceMs": 0},
                        "nextEdit": {"backoff": False},
                        "remote": {"url": standin.url, "api": "mercury", "apiKey": KEY}}
            results.append(await run_cases(cases, settings, "remote stand-in (oracle)"))
    return {"machine": machine(), "model": args.model or "bundled", "cases": len(cases),
            "results": results}


def run_next_edit_bench(args) -> int:
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    payload = asyncio.run(bench(args))
    print(f"{'':32} {'cases':>5} {'exact':>6} {'suggest':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for result in payload["results"]:
        for name, row in [("all", result["all"]), *result["by_kind"].items()]:
            if row["cases"]:
                print(f"{result['label'] + ' ' + name:32} {row['cases']:>5} "
                      f"{row['exact_match']:>6.2f} {row['suggested']:>7.2f} "
                      f"{row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f}")
    publish("next-edit", payload, lambda: None)
    return 0


__all__ = ["Case", "asdict", "build_cases", "run_next_edit_bench"]
