"""The `infill` and `demo` commands, and the model a command runs (`load_for_cli`): plain-script
use of the model, no LSP involved."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from model.loader import LoadedModel, ModelLoadError, bundled_model_path, load_model
from model.sampler import Infill, InfillOptions, apply_step, final_text, forward_holes, new_state

log = logging.getLogger(__name__)

DEMO_PREFIX = (
    "def is_palindrome(text: str) -> bool:\n"
    '    """True when text reads the same backwards."""\n'
    "    "
)
DEMO_SUFFIX = "\n\n\nprint(is_palindrome('level'))\n"
TINY_FALLBACK_DIR = Path(tempfile.gettempdir()) / "diffusion-lsp-tiny-random"


def load_for_cli(args) -> LoadedModel:
    """The model named on the command line; the bundled one by default.

    With no bundled model and no --model, a tiny random-weight model stands in so that the
    commands can still be tried: its output is noise, and a warning says so.
    """
    if args.model is None and bundled_model_path() is None:
        from model.tiny import write_tiny_model

        print("warning: no bundled model is installed; using a tiny RANDOM-weight model "
              "whose output is noise (pass --model PATH for real completions)", file=sys.stderr)
        if not (TINY_FALLBACK_DIR / "model.safetensors").exists():
            write_tiny_model(TINY_FALLBACK_DIR)
        return load_model(TINY_FALLBACK_DIR, device=args.device, dtype=args.dtype)
    return load_model(args.model, family=args.family, device=args.device, dtype=args.dtype)


# ---------------------------------------------------------------------------------------------
# infill


def _parse_record(line: str, number: int) -> tuple[object, str, str]:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    prefix, suffix = record.get("prefix"), record.get("suffix", "")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError('"prefix" (and "suffix", if given) must be strings')
    return record.get("id", number), prefix, suffix


def _record_id(line: str, number: int) -> object:
    try:
        record = json.loads(line)
        return record.get("id", number) if isinstance(record, dict) else number
    except json.JSONDecodeError:
        return number


def infill_records(model: LoadedModel, lines: list[str], options: InfillOptions, progress=None):
    """Yield one output record per non-blank input line, in input order."""
    from model.sampler import infill

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record_id, prefix, suffix = _parse_record(line, number)
        except (json.JSONDecodeError, ValueError) as exc:
            yield {"id": _record_id(line, number), "error": f"line {number}: {exc}"}
        else:
            began = time.perf_counter()
            result: Infill = infill(model, prefix, suffix, options)
            yield {
                "id": record_id,
                "completion": result.text,
                "steps": result.steps,
                "tokens": result.tokens,
                "finish_reason": result.finish_reason,
                "latency_ms": round((time.perf_counter() - began) * 1e3, 2),
            }
        if progress is not None:
            progress()


def run_infill(args) -> int:
    from rich.progress import Progress

    try:
        model = load_for_cli(args)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    overrides = {"max_tokens": args.max_tokens, "single_line": args.single_line}
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    options = InfillOptions(**overrides)
    lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    total = sum(1 for line in lines if line.strip())
    with Progress(transient=True, disable=total < 5) as bar, \
            open(args.output, "w", encoding="utf-8") as out:
        task = bar.add_task("infilling", total=total)
        for record in infill_records(model, lines, options, lambda: bar.advance(task)):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
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
            (logits,) = forward_holes(model, [state])
            apply_step(model, state, logits)
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
    return 0
