"""The `infill` and `demo` commands: plain-script use of the model, no LSP involved. The model
they run is `model.network.load.load_for_cli`'s."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from diffusion_contract.options import COMMIT_SETTINGS, SAMPLER_SETTINGS, InfillOptions
from model.catalog.paths import PREVIEW_NOTICE, bundled_model_path
from model.decoding.hole import Infill, final_text
from model.decoding.sampler import denoise_step, new_state
from model.network.load import load_for_cli
from model.network.loader import LoadedModel, ModelLoadError

log = logging.getLogger(__name__)

DEMO_PREFIX = (
    "def is_palindrome(text: str) -> bool:\n"
    '    """True when text reads the same backwards."""\n'
    "    "
)
DEMO_SUFFIX = "\n\n\nprint(is_palindrome('level'))\n"
# ---------------------------------------------------------------------------------------------
# infill
#
# Input is JSON lines read as bytes: a record ends at b"\n" and nowhere else (a raw U+2028 or
# U+0085 inside a JSON string stays in its record), and a record that is not UTF-8 or not JSON
# becomes one error record. The context is cut as the server cuts it, so a huge prefix costs
# no more than the budget. Ctrl-C stops after the record being filled (twice: at once); what
# was written stays written, and the exit status is 130.

INTERRUPTED = 130  # the shell's exit status for a command stopped by SIGINT
# characters str.splitlines() (and some JSONL readers) take for line ends; escaped on output so
# that every output record is one line for any reader
LINE_END_LOOKALIKES = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085",
                       "\x1c": "\\u001c", "\x1d": "\\u001d", "\x1e": "\\u001e"}


class BadRecord(ValueError):
    """An input line that is not a hole; the message says why, for the error record."""


@dataclass(frozen=True)
class Budget:
    """Token budgets for the context (the server's defaults unless given)."""

    prefix_tokens: int
    suffix_tokens: int


def decode_record(raw: bytes) -> dict:
    """One input line as a JSON object; raises BadRecord."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
                        ) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord(f"not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise BadRecord("a record must be a JSON object")
    return record


def parse_record(raw: bytes, number: int) -> tuple[object, str, str]:
    """(id, prefix, suffix) of one input line; raises BadRecord."""
    return one_hole(decode_record(raw), number)


def one_hole(record: dict, number: int) -> tuple[object, str, str]:
    prefix, suffix = record.get("prefix"), record.get("suffix", "")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise BadRecord('"prefix" (and "suffix", if given) must be strings')
    return record.get("id", number), prefix, suffix


def several_holes(record: dict, number: int) -> tuple[object, str, list[tuple[int, int]]]:
    """(id, text, spans) of a record with several holes: `{"id", "text", "holes": [[start,
    end], ...]}`, each hole the span text[start:end] (code points; empty: an insertion point)
    that the model's text replaces, in order, none overlapping another."""
    text, holes = record.get("text"), record.get("holes")
    if not isinstance(text, str):
        raise BadRecord('"text" must be a string')
    if not isinstance(holes, list) or not holes:
        raise BadRecord('"holes" must be a non-empty list of [start, end] spans')
    spans, previous = [], 0
    for hole in holes:
        if (not isinstance(hole, list) or len(hole) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in hole)):
            raise BadRecord(f"a hole must be [start, end] (integers), got {hole!r}")
        start, end = hole
        if not previous <= start <= end <= len(text):
            raise BadRecord(f"hole {hole} must lie in the text ({len(text)} characters), "
                            "after the one before it, start <= end")
        spans.append((start, end))
        previous = end
    return record.get("id", number), text, spans


def record_id(raw: bytes, number: int) -> object:
    """The id of a bad record where it can still be read, else its line number."""
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return number
    return record.get("id", number) if isinstance(record, dict) else number


def to_jsonl(record: dict) -> str:
    """One output line: UTF-8 JSON with line-end lookalikes escaped, ending in "\n"."""
    text = json.dumps(record, ensure_ascii=False)
    for char, escaped in LINE_END_LOOKALIKES.items():
        text = text.replace(char, escaped)
    return text + "\n"


def infill_records(model: LoadedModel, lines: Iterable[bytes], options: InfillOptions,
                   budget: Budget, progress=None, previews: bool = False):
    """Yield one output record per non-blank input line (bytes, as read), in input order: a
    `{"prefix", "suffix"}` record fills one hole, a `{"text", "holes"}` record several jointly
    (`several_holes`); with `previews`, each record lists the states the holes went through."""
    def count_tokens(text: str) -> int:
        return len(model.tokenizer.encode(text, add_special_tokens=False).ids) if text else 0

    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = decode_record(raw)
            several = "holes" in record
            parsed = several_holes(record, number) if several else one_hole(record, number)
        except BadRecord as exc:
            yield {"id": record_id(raw, number), "error": f"line {number}: {exc}"}
        else:
            fill = fill_several if several else fill_one
            yield fill(model, parsed, options, budget, count_tokens, previews)
        if progress is not None:
            progress()


def fill_one(model: LoadedModel, parsed, options: InfillOptions, budget: Budget,
             count_tokens, previews: bool) -> dict:
    from lsp_server.context import cut_hole
    from model.decoding.preview import state_preview
    from model.decoding.sampler import infill

    key, prefix, suffix = parsed
    began = time.perf_counter()
    prefix, suffix = cut_hole(prefix, suffix, count_tokens, budget.prefix_tokens,
                              budget.suffix_tokens)
    states: list[dict] = []

    def seen(state) -> None:
        step, steps, text = state_preview(model, state)
        states.append({"step": step, "steps": steps, "text": text})

    result: Infill = infill(model, prefix, suffix, options, on_step=seen if previews else None)
    out = {
        "id": key,
        "completion": result.text,
        "steps": result.steps,
        "tokens": result.tokens,
        "context_tokens": count_tokens(prefix) + count_tokens(suffix),
        "finish_reason": result.finish_reason,
        "latency_ms": round((time.perf_counter() - began) * 1e3, 2),
    }
    return out | ({"previews": states} if previews else {})


def fill_several(model: LoadedModel, parsed, options: InfillOptions, budget: Budget,
                 count_tokens, previews: bool) -> dict:
    """Every hole of a record masked in one sequence and denoised jointly."""
    from lsp_server.context import cut_hole
    from model.decoding.multi_hole import infill_holes, multi_preview

    key, text, spans = parsed
    began = time.perf_counter()
    pieces = [text[:spans[0][0]],
              *(text[a[1]:b[0]] for a, b in zip(spans, spans[1:], strict=False)),
              text[spans[-1][1]:]]
    pieces[0], pieces[-1] = cut_hole(pieces[0], pieces[-1], count_tokens,
                                     budget.prefix_tokens, budget.suffix_tokens)
    states: list[dict] = []

    def seen(state) -> None:
        step, steps, texts = multi_preview(model, state)
        states.append({"step": step, "steps": steps, "holes": texts})

    result = infill_holes(model, pieces, options, on_step=seen if previews else None)
    filled, last = [], 0
    for (start, end), completion in zip(spans, result.texts, strict=True):
        filled += [text[last:start], completion]
        last = end
    out = {
        "id": key,
        "completions": result.texts,
        "text": "".join(filled) + text[last:],
        "steps": result.steps,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "latency_ms": round((time.perf_counter() - began) * 1e3, 2),
    }
    return out | ({"previews": states} if previews else {})


class StopOnInterrupt:
    """While active, the first SIGINT asks the loop to stop after the current record; a
    second one interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("interrupted: stopping after the current record (Ctrl-C again to stop now)",
              file=sys.stderr)


def count_records(path: Path) -> int:
    """Non-blank lines of `path`, read in blocks (for the progress bar)."""
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def run_infill(args) -> int:
    try:
        with StopOnInterrupt() as interrupt:
            return _infill_file(args, interrupt)
    except KeyboardInterrupt:
        print("interrupted: stopped; the records written so far are complete", file=sys.stderr)
        return INTERRUPTED


def _infill_file(args, interrupt: StopOnInterrupt) -> int:
    from rich.progress import Progress

    overrides = {"max_tokens": args.max_tokens, "single_line": args.single_line,
                 **{setting.name: getattr(args, setting.name)
                    for setting in (*COMMIT_SETTINGS, *SAMPLER_SETTINGS)
                    if getattr(args, setting.name) is not None}}
    try:
        options = InfillOptions(**overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        model = load_for_cli(args)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.threshold is None and model.family.threshold is not None:  # the card's
        options = dataclasses.replace(options, threshold=model.family.threshold)
    budget = Budget(args.prefix_tokens, args.suffix_tokens)
    source = Path(args.input)
    total = count_records(source)
    with Progress(transient=True, disable=total < 5) as bar, source.open("rb") as lines, \
            open(args.output, "w", encoding="utf-8") as out:
        task = bar.add_task("infilling", total=total)
        for record in infill_records(model, lines, options, budget, lambda: bar.advance(task),
                                     previews=args.previews):
            out.write(to_jsonl(record))
            out.flush()
            if interrupt.requested:
                print(f"interrupted: stopped after {record['id']!r}; the records written so "
                      "far are complete", file=sys.stderr)
                return INTERRUPTED
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def render_hole(model: LoadedModel, hole: list[int], fresh: set[int]):
    """Rich text of a hole: masks as shaded blocks, new tokens highlighted."""
    from rich.text import Text

    shown = Text()
    for position, token in enumerate(hole):
        if token == model.ids.mask:
            shown.append("░", style="grey50")
        elif token == model.ids.end_of_hole or token in model.ids.extra_end:
            shown.append("·", style="grey23")
        else:
            piece = model.tokenizer.decode([token], skip_special_tokens=False)
            shown.append(piece, style="bold green" if position in fresh else "cyan")
    return shown


def run_demo(args) -> int:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    console = Console(stderr=False)
    try:
        model = load_for_cli(args)
    except (ModelLoadError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    prefix = DEMO_PREFIX if args.prefix is None else args.prefix
    suffix = DEMO_SUFFIX if args.suffix is None else args.suffix
    options = InfillOptions(max_tokens=args.max_tokens)
    state = new_state(model, prefix, suffix, options)
    console.print(f"[bold]model[/bold] {model.path} ({model.family.name} family, "
                  f"{model.device.type}, {sum(p.numel() for p in model.network.parameters()):,} "
                  "parameters)")

    def frame(fresh: set[int], caption: str):
        body = Text(prefix, style="white")
        body.append_text(render_hole(model, state.hole.tolist(), fresh))
        body.append(suffix, style="white")
        return Group(Panel(body, title="denoising the hole", border_style="blue"), Text(caption))

    def show_steps(show) -> None:
        show(frame(set(), "step 0: all masks"))
        time.sleep(args.delay)
        while not state.finished:
            denoise_step(model, [state])
            fresh = {position for position, _ in state.trace[-1].committed}
            show(frame(fresh, f"step {state.steps}: committed {len(fresh)} token(s)"))
            time.sleep(args.delay)

    began = time.perf_counter()
    if console.is_terminal:  # redraw in place
        with Live(console=console, refresh_per_second=30) as live:
            show_steps(live.update)
    else:  # a log: one frame per step
        show_steps(console.print)
    model_ms = (time.perf_counter() - began) * 1e3 - args.delay * (state.steps + 1) * 1e3
    text, tokens = final_text(model, state)
    console.print(f"[bold]completion[/bold] {text!r}")
    console.print(f"{tokens} tokens in {state.steps} forward passes "
                  f"({tokens / max(state.steps, 1):.2f} tokens per step), "
                  f"{max(model_ms, 0):.0f} ms of model time; finished by {state.finish_reason}")
    if model.path == bundled_model_path():
        console.print(f"[bold yellow]note:[/bold yellow] {PREVIEW_NOTICE}", highlight=False)
    return 0
