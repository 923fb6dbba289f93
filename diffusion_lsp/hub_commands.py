"""The `pull` and `models` commands: the terminal side of model/catalog/hub.py (progress,
tables)."""

from __future__ import annotations

import json
import sys

from model.catalog import hub
from model.catalog.paths import GET_A_REAL_MODEL, WEIGHTS_GLOB, bundled_model_path, hf_hub_dir
from model.catalog.registry import find_supported


def run_pull(args) -> int:
    """`diffusion-lsp pull MODEL`: plan, show what will come, download with a progress bar."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    try:
        plan = hub.plan_pull(args.model, revision=args.revision)
    except hub.PullError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    repo_id = plan.repo.repo_id
    if find_supported(args.model) is None:
        console.print(f"note: {repo_id} is not in the supported table (`diffusion-lsp models`); "
                      f"it loads if its family is detected or given with --family",
                      highlight=False)
    resumable = plan.partial_bytes()
    console.print(
        f"{repo_id} @ {plan.repo.commit[:12]}: {len(plan.files)} files, "
        f"{hub.format_bytes(plan.total_bytes)}"
        + (f" ({hub.format_bytes(resumable)} already downloaded, resuming)" if resumable else ""),
        highlight=False)
    done_by_file: dict[str, int] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(repo_id, total=plan.total_bytes)

        def progress(path: str, done: int, total: int) -> None:
            done_by_file[path] = done
            bar.update(task, completed=sum(done_by_file.values()), description=path)

        try:
            result = hub.run_pull(plan, progress)
        except hub.PullError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            return 1
        except KeyboardInterrupt:
            console.print("interrupted: run the same command again to resume")
            return 130
        bar.update(task, description=repo_id)
    console.print(_summary(result), highlight=False)
    console.print(f"use it with: --model {args.model}", highlight=False)
    print(result.snapshot)  # stdout: the one line a script needs
    return 0


def _summary(result: hub.PullResult) -> str:
    parts = [f"downloaded {len(result.downloaded)} file(s)"]
    if result.resumed:
        parts.append(f"{len(result.resumed)} resumed")
    if result.present:
        parts.append(f"{len(result.present)} already present")
    if result.repaired:
        parts.append(f"{len(result.repaired)} corrupt on disk and downloaded again: "
                     f"{', '.join(result.repaired)}")
    return "; ".join(parts) + "; all verified against the hub's sizes and hashes"


def _state(local: hub.LocalModel) -> str:
    if local.state == "ready":
        return f"ready ({hub.format_bytes(local.size_bytes)})"
    if local.state == "partial":
        return f"partial ({hub.format_bytes(local.partial_bytes)}; pull again to resume)"
    if local.state == "incomplete":
        lacking = ", ".join(local.missing[:3]) or "unfinished downloads"
        return f"incomplete (missing {lacking}; pull again)"
    return "-"


def bundled_row() -> hub.ModelRow | None:
    """The model shipped in this repository, as a row of `models` (None when absent)."""
    path = bundled_model_path()
    if path is None:
        return None
    size = sum(f.stat().st_size for f in path.glob(WEIGHTS_GLOB))
    return hub.ModelRow("bundled", "(this repository: model/bundled)", "default",
                        hub.format_bytes(size), "any CPU; a PREVIEW: its completions are not "
                        f"useful yet (`{GET_A_REAL_MODEL}` gets a real one)",
                        hub.LocalModel("bundled", path, size_bytes=size))


MIN_HARDWARE_WIDTH = 28  # `models`: the table's folding columns keep words readable
MIN_STATE_WIDTH = 12


def _quantized_size(name: str, scheme: str) -> float | None:
    """The weights' size in GB with `--quantization scheme` (None: not a known model)."""
    known = find_supported(name)
    return None if known is None else round(known.size_gb_in(scheme), 1)


def run_models(args) -> int:
    """`diffusion-lsp models`: the supported models and what is on disk (no network). Only
    the table's own modules are imported (no torch): it prints at once."""
    rows = [row for row in (bundled_row(), *hub.model_rows()) if row is not None]
    if args.json:
        print(json.dumps([{
            "name": r.name, "repo_id": r.repo_id, "family": r.family, "size": r.size,
            "hardware": r.hardware, "state": r.local.state,
            "size_gb_int8": _quantized_size(r.name, "int8"),
            "size_gb_int4": _quantized_size(r.name, "int4"),
            "path": str(r.local.snapshot) if r.local.snapshot else None,
            "missing": r.local.missing,
        } for r in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models (cache: {hf_hub_dir()})", title_justify="left")
    # the name above its repository id, each on a line of its own: never broken mid-name
    for column in ("model (repository)", "family", "download", "int8 / int4"):
        table.add_column(column, no_wrap=True)
    table.add_column("hardware", overflow="fold", min_width=MIN_HARDWARE_WIDTH)
    table.add_column("on disk", overflow="fold", min_width=MIN_STATE_WIDTH)
    for r in rows:
        int8, int4 = (_quantized_size(r.name, s) for s in ("int8", "int4"))
        name = r.name if r.name == r.repo_id else f"{r.name}\n{r.repo_id}"
        sizes = "-" if int8 is None or int4 is None else f"{int8:.1f} / {int4:.1f} GB"
        table.add_row(name, r.family, r.size, sizes, r.hardware, _state(r.local))
    console = Console(file=sys.stdout, width=max(Console().width, 140))
    console.print(table)
    ready = [r for r in rows if r.local.state == "ready"]
    for r in ready:
        console.print(f"{r.name}: {r.local.snapshot}", highlight=False, soft_wrap=True)
    return 0
