"""`diffusion-lsp bench confidence`: the confidence floor's trade-off, and what is offered.

A completion's confidence is the probability its least sure token was committed with
(`model.decoding.hole.Confidence.lowest`). The floor is chosen on one half of HumanEval-infilling's
single-line holes and reported on the other (held-out) half, split by problem: even-numbered
problems calibrate, odd-numbered ones are held out.

1. model only: every hole filled as the server fills a single-line completion (the cursor after
   the line's indentation). A suggestion is *right* when the hole's line starts with it (taking
   it leaves the user on the way to the right line; *exact* when it is the whole line), *wrong*
   otherwise. For each floor: the wrong suggestions it removes, the right ones it loses. The
   calibrated floor is, of those losing at most MAX_RIGHT_LOST of the calibration half's right
   suggestions, the lowest that removes the most wrong ones.
2. over LSP, held-out holes only: each hole as a document while its line is typed (the
   indentation and first word written, the cursor after them); the server's answer at the
   cursor, once with the defaults (the model's floor and the parse check) and once with both
   off. Counted: what is
   offered, what is suppressed and why, and how many offered suggestions turn a file that
   parsed into one that does not (`lsp_server.parse_check`).

    diffusion-lsp bench confidence [--limit N] [--model M] [--data DIR]
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from benchmarks.report import load_holes, machine, publish
from diffusion_contract.options import hole_options
from lsp_server.parse_check import breaks_parse, inserted, parses
from model.decoding.sampler import infill
from model.network.loader import LoadedModel

FLOORS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_RIGHT_LOST = 0.10  # the calibrated floor loses at most this share of the right suggestions
SINGLE_LINE_TOKENS = 32  # the server's completion.maxTokensSingleLine default
NAME = "confidence"


def problem_number(hole: dict) -> int:
    return int(hole["task_id"].split("/")[2])  # SingleLineInfilling/HumanEval/N/Lk


def halves(holes: list[dict]) -> tuple[list[dict], list[dict]]:
    """(calibration, held out): even-numbered problems, odd-numbered ones."""
    return ([h for h in holes if problem_number(h) % 2 == 0],
            [h for h in holes if problem_number(h) % 2 == 1])


def at_cursor(hole: dict) -> tuple[str, str, str]:
    """(prefix, suffix, the line's text after its indentation): the cursor after the hole
    line's indentation, the rest of the line gone."""
    middle = hole["canonical_solution"]
    body = middle.lstrip(" \t")
    return hole["prompt"] + middle[: len(middle) - len(body)], "\n" + hole["suffix"], body


def typing_the_line(hole: dict) -> tuple[str, str]:
    """(prefix, suffix) while the hole's line is being typed: its indentation and first word
    written, the rest of the line gone (a single-line completion at the cursor; the file may
    or may not parse there, as while typing)."""
    prefix, suffix, body = at_cursor(hole)
    word = re.match(r"\w*\W?", body).group(0).rstrip("\n")
    return prefix + word, suffix


# ---------------------------------------------------------------------------------------------
# model only


def fill_all(model: LoadedModel, holes: list[dict]) -> list[dict]:
    options = hole_options(SINGLE_LINE_TOKENS, single_line=True)
    rows = []
    for hole in holes:
        prefix, suffix, line = at_cursor(hole)
        result = infill(model, prefix, suffix, options)
        text = result.text.rstrip()
        right_line = line.rstrip("\n").rstrip()
        rows.append({
            "task_id": hole["task_id"], "text": text,
            "lowest": result.confidence.lowest if result.confidence else None,
            "mean": result.confidence.mean if result.confidence else None,
            "right": bool(text.strip()) and right_line.startswith(text.strip()),
            "exact": text.strip() == right_line.strip()})
    return rows


def trade_off(rows: list[dict], measure: str = "lowest") -> list[dict]:
    """Per floor: suggestions offered, wrong ones removed, right (and exact) ones lost."""
    offered = [r for r in rows if r["text"].strip() and r[measure] is not None]
    wrong = [r for r in offered if not r["right"]]
    right = [r for r in offered if r["right"]]
    table = []
    for floor in FLOORS:
        kept = [r for r in offered if r[measure] >= floor]
        table.append({
            "floor": floor, "offered": len(kept),
            "wrong_removed": sum(r[measure] < floor for r in wrong), "wrong": len(wrong),
            "right_lost": sum(r[measure] < floor for r in right), "right": len(right),
            "exact_lost": sum(r[measure] < floor for r in right if r["exact"]),
            "exact": sum(r["exact"] for r in right)})
    return table


def calibrate(table: list[dict]) -> float:
    """Of the floors losing at most MAX_RIGHT_LOST of the right suggestions, the lowest that
    removes the most wrong ones (no higher floor than the evidence asks for)."""
    allowed = [row for row in table if row["right_lost"] <= MAX_RIGHT_LOST * row["right"]]
    if not allowed:
        return 0.0
    most = max(row["wrong_removed"] for row in allowed)
    return min(row["floor"] for row in allowed if row["wrong_removed"] == most)


# ---------------------------------------------------------------------------------------------
# over LSP


async def offered_over_lsp(holes: list[dict], settings: dict) -> dict:
    """Each hole's document while its line is typed (`typing_the_line`): what the server
    offers at the cursor, and how many of those break a file that parsed."""
    from benchmarks.lsp_client import inline, open_document, running_server, stats

    offered = breaking = 0
    async with running_server(settings) as client:
        for index, hole in enumerate(holes):
            prefix, suffix = typing_the_line(hole)
            text = prefix + suffix
            lines = prefix.split("\n")
            uri = f"untitled:held-out-{index}.py"
            open_document(client, uri, text)
            answer = await inline(client, uri, len(lines) - 1, len(lines[-1]))
            items = answer.items if answer is not None and hasattr(answer, "items") else []
            for item in items:
                offered += 1
                breaking += breaks_parse(text, inserted(text, len(prefix), item.insert_text),
                                         "python")
        server = await stats(client)
    return {"holes": len(holes), "offered": offered, "offered_breaking_parse": breaking,
            "parsed_before": sum(parses(typing_the_line(h)[0] + typing_the_line(h)[1],
                                        "python") is True for h in holes),
            "suppressed": server["suppressed"], "empty": server["empty"]}


# ---------------------------------------------------------------------------------------------
# the command


def run_confidence_bench(args) -> int:
    from model.catalog.paths import min_confidence
    from model.network.load import load_for_cli

    data = Path(args.data) if args.data else None
    calibration, held_out = halves(load_holes("single-line", 2 * args.limit, data))
    model = load_for_cli(args)
    began = time.perf_counter()
    rows = {"calibration": fill_all(model, calibration), "held_out": fill_all(model, held_out)}
    tables = {measure: {half: trade_off(rows[half], measure) for half in rows}
              for measure in ("lowest", "mean")}
    chosen = calibrate(tables["lowest"]["calibration"])
    stored = min_confidence(model.path)
    print(f"{model.path.name}: {len(calibration)} calibration, {len(held_out)} held-out holes "
          f"({time.perf_counter() - began:.0f} s); floor calibrated {chosen}, stored {stored}")
    print("held out: floor  offered  wrong removed  right lost  exact lost")
    for row in tables["lowest"]["held_out"]:
        print(f"          {row['floor']:5.2f}  {row['offered']:7d}  "
              f"{row['wrong_removed']:6d}/{row['wrong']:<6d}  {row['right_lost']:4d}/"
              f"{row['right']:<5d}  {row['exact_lost']:4d}/{row['exact']}")
    model_path = args.model
    base = {"completion": {"debounceMs": 0}, "model": {"path": model_path} if model_path else {}}
    off = {**base, "completion": {"debounceMs": 0, "minConfidence": 0, "checkParse": False}}
    lsp = {"defaults": asyncio.run(offered_over_lsp(held_out, base)),
           "floor_and_parse_check_off": asyncio.run(offered_over_lsp(held_out, off))}
    for name, figures in lsp.items():
        print(f"over LSP, {name}: {figures['offered']} offered on {figures['holes']} held-out "
              f"holes, {figures['offered_breaking_parse']} of them break the file's parse; "
              f"suppressed {figures['suppressed']}")
    payload = {"machine": machine(), "model": str(model.path), "measure": "lowest",
               "max_right_lost": MAX_RIGHT_LOST, "calibrated_floor": chosen,
               "stored_floor": stored, "holes": {k: len(v) for k, v in rows.items()},
               "trade_off": tables, "lsp_held_out": lsp, "rows": rows}
    publish(NAME, payload, lambda: None)
    return 0
