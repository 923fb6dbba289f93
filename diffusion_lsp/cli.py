"""`diffusion-lsp`: the one command-line parser; each subcommand imports what it needs lazily."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from diffusion_contract.options import COMMIT_SETTINGS, QUANTIZATIONS, SAMPLER_SETTINGS
from lsp_server.settings import ContextSettings

CONTEXT = ContextSettings()  # the server's context budgets, the default for `infill` too
PACKAGE = Path(__file__).resolve().parent
NEEDS_BENCHMARKS = ("bench", "eval")  # commands whose code lives in the checkout's benchmarks/
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DATA_HELP = ("folder with the HumanEval-*Infilling.jsonl.gz files (default: "
             "../shared/eval-data/humaneval-infilling; get them from the data/ folder of "
             "https://github.com/openai/human-eval-infilling)")
NO_CHECKOUT = ("diffusion-lsp {command}: benchmarks/ ships with the source checkout, not the "
               "installed package: git clone the repository and run `pip install -e .` in it")


def version() -> str:
    """The installed distribution's version, else pyproject.toml's (a plain checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("diffusion-lsp")
    except PackageNotFoundError:
        import re

        pyproject = PACKAGE.parent / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if (
            pyproject.is_file()) else None
        return found.group(1) if found else "unknown"


def source_checkout(package: Path = PACKAGE) -> Path | None:
    """The source checkout `diffusion_lsp` runs from: the folder above the package when it
    holds pyproject.toml and benchmarks/ (an editable install, or a plain checkout); None for
    an installed wheel (site-packages, even one holding another project's `benchmarks`)."""
    root = package.parent
    markers = (root / "pyproject.toml", root / "benchmarks" / "__init__.py")
    return root if all(marker.is_file() for marker in markers) else None


def use_benchmarks() -> bool:
    """Make the checkout's `benchmarks` importable (it is not installed); False without one."""
    root = source_checkout()
    if root is None:
        return False
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return True


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model directory, or a repo id / short name in the HF cache "
                             "(see `diffusion-lsp models`; default: the bundled model)")
    parser.add_argument("--family", default=None,
                        help="default | dream | diffucoder | dreamon | open-dcoder | llada "
                             "(default: config.json's diffusion_lsp block, else detect)")
    parser.add_argument("--family-override", action="append", default=None,
                        metavar="KEY=VALUE",
                        help="replace one family field, e.g. mask_token=<M> (repeatable; keys: "
                             "mask_token end_of_hole_token bos_token eos_token pad_token "
                             "expand_token delete_token extra_end_tokens shifted_logits "
                             "always_bos delete_pads_right)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--dtype", default="auto",
                        help="auto | float32 | bfloat16 | float16 (default: auto, what "
                             "measured fastest on this device)")
    _add_quantization_arg(parser)


def _add_quantization_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                        help="the transformer's linear weights: none (the checkpoint's dtype), "
                             "int8, int4, or auto (the device's best that fits; default)")


def _add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """The sampler's settings (diffusion_contract/options.py; docs/models.md, "Sampler settings"),
    one flag each; unset = the sampler's default."""
    group = parser.add_argument_group("sampler (how a step commits; the reference samplers "
                                      "Dream, LLaDA)")
    for setting in (*COMMIT_SETTINGS, *SAMPLER_SETTINGS):
        default = "none" if setting.default is None else setting.default
        help = f"{setting.help} (default: {default})"
        if setting.choices:
            group.add_argument(setting.flag, choices=setting.choices, default=None, help=help)
        elif setting.default is False:
            group.add_argument(setting.flag, action="store_true", default=None, help=help)
        else:
            kind = next(kind for kind in (int, float) if kind in (setting.type,
                                                                   *get_args(setting.type)))
            group.add_argument(setting.flag, type=kind, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-lsp",
        description="Code completion for any LSP editor, served by a diffusion language model.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the language server (stdio by default)")
    serve.add_argument("--tcp", action="store_true", help="listen on TCP instead of stdio")
    serve.add_argument("--host", default="127.0.0.1",
                       help="with --tcp: the address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=2087,
                       help="with --tcp: the port to listen on (default: %(default)s)")
    serve.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                       help="what goes to the log (default: %(default)s)")
    serve.add_argument("--log-file", default=None,
                       help="write the log to this file (default: stderr, which editors show "
                            "in their output panel)")
    _add_model_args(serve)

    infill = commands.add_parser("infill", help="fill holes from a JSONL file")
    infill.add_argument("--input", required=True,
                        help='JSONL: {"id", "prefix", "suffix"}, or several holes filled '
                             'jointly: {"id", "text", "holes": [[start, end], ...]}')
    infill.add_argument("--previews", action="store_true",
                        help="add each record's intermediate states (masked tokens as \u2591)")
    infill.add_argument("--output", required=True,
                        help='JSONL: {"id", "completion", "steps", "latency_ms"}')
    infill.add_argument("--max-tokens", type=int, default=64,
                        help="tokens in one completion, at most (default: %(default)s)")
    infill.add_argument("--single-line", action="store_true",
                        help="stop each completion at the end of its line (default: off)")
    _add_sampler_args(infill)
    infill.add_argument("--prefix-tokens", type=int, default=CONTEXT.prefix_tokens,
                        help="context before the hole, cut by whole lines as the server cuts "
                             "it (default: %(default)s, the server's)")
    infill.add_argument("--suffix-tokens", type=int, default=CONTEXT.suffix_tokens,
                        help="context after the hole (default: %(default)s)")
    _add_model_args(infill)

    demo = commands.add_parser("demo", help="watch a hole being denoised, step by step")
    demo.add_argument("--prefix", default=None,
                      help="text before the hole (default: a palindrome function's start)")
    demo.add_argument("--suffix", default=None,
                      help="text after the hole (default: a call of that function)")
    demo.add_argument("--max-tokens", type=int, default=32,
                      help="tokens in the hole, at most (default: %(default)s)")
    demo.add_argument("--delay", type=float, default=0.25,
                      help="seconds between steps shown (default: %(default)s)")
    _add_model_args(demo)

    evaluate = commands.add_parser("eval", help="measure quality (HumanEval infilling)")
    evaluate.add_argument("benchmark", choices=["humaneval-infilling"],
                          help="the benchmark (HumanEval-infilling, Bavarian et al. 2022)")
    evaluate.add_argument("--split", choices=["single-line", "multi-line"], default="single-line",
                          help="which holes (default: %(default)s)")
    evaluate.add_argument("--limit", type=int, default=None,
                          help="this many holes, evenly spaced over the split (default: all)")
    evaluate.add_argument("--data", default=None, help=DATA_HELP)
    evaluate.add_argument("--output", default=None,
                          help="JSON result file (default: benchmarks/results/eval-...json)")
    evaluate.add_argument("--max-tokens", type=int, default=None,
                          help="tokens in one completion, at most (default: 32 single-line, "
                               "64 multi-line)")
    _add_model_args(evaluate)

    bench = commands.add_parser("bench", help="speed benchmarks of the model (no LSP)")
    bench.add_argument("name", choices=["latency", "throughput", "vs-autoregressive", "lsp",
                                        "cache-agreement", "typing", "cpu", "multi-hole",
                                        "next-edit", "confidence", "quantization", "load"],
                       help="lsp: end to end through a real LSP client (the server over stdio); "
                            "cache-agreement: how often the context cache changes completions "
                            "(tiny checkpoints of every family and the bundled model); "
                            "typing: first request vs the one after a typed character, over "
                            "LSP and model only, with the document context cache; cpu: pass "
                            "times per dtype and a profile of where they go; multi-hole: two "
                            "lines of HumanEval solutions filled jointly vs one after another; "
                            "next-edit: exact match and latency of next edits "
                            "(docs/next-edits.md); confidence: the confidence floor's "
                            "trade-off on held-out holes, and what is offered over LSP; "
                            "quantization: none / int8 / int4 side by side, speed and "
                            "agreement (docs/benchmarks.md); load: 1 / 2 / 4 editors against one "
                            "replica's engine, batched steps packed and through transformers "
                            "side by side (--limit: completions per editor and round)")
    bench.add_argument("--limit", type=int, default=40,
                       help="holes per split (default: %(default)s)")
    bench.add_argument("--max-tokens", type=int, default=32,
                       help="tokens in one completion, at most (default: %(default)s)")
    bench.add_argument("--tokens-per-step", type=int, default=None,
                       help="vs-autoregressive: fixed tokens per step (default: threshold)")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--tiny-families", action="store_true",
                       help="multi-hole: also each family's tiny random checkpoint")
    bench.add_argument("--preview", action="store_true",
                       help="lsp: ask every hole twice, live previews off and on, and report "
                            "what previews cost")
    bench.add_argument("--data", default=None, help=DATA_HELP)
    bench.add_argument("--shape", default=None,
                       help="instead of --model: random weights of a published shape "
                            "(qwen2.5-7b = Dream-Coder-7B, GPU only; qwen2.5-0.5b = "
                            "Open-dCoder-0.5B and tiny-qwen2 run on a CPU)")
    bench.add_argument("--strategy", default=None, choices=["doubt", "region"],
                       help="next-edit: the local rewrite to measure (default: both)")
    bench.add_argument("--remote-url", default=None,
                       help="next-edit: a real edit endpoint (key in DIFFUSION_LSP_TOKEN) "
                            "instead of the stand-in")
    bench.add_argument("--part", choices=["quality", "speed", "both"], default=None,
                       help="quantization: which half (default: both)")
    bench.add_argument("--rounds", type=int, default=2,
                       help="load: rounds of every level, their order rotated (default: "
                            "%(default)s)")
    bench.add_argument("--remote-only", action="store_true",
                       help="next-edit: measure the remote only")
    bench.add_argument("--next-edits", action="store_true",
                       help="typing: each typed character also asks for a next edit, as the "
                            "editors do, while the completion is timed")
    bench.add_argument("--against", default=None, metavar="CHECKOUT",
                       help="typing: also the server of another source checkout (e.g. a git "
                            "worktree of an older commit), hole by hole right after this one's, "
                            "so that both see the same load (default: none)")
    _add_model_args(bench)

    service = commands.add_parser(
        "service", help="serve the FIM completions API on Ray Serve, shared by many editors")
    service.add_argument("--host", default="127.0.0.1",
                         help="the address to listen on; beyond loopback only with "
                              "DIFFUSION_LSP_TOKEN set (default: %(default)s)")
    service.add_argument("--port", type=int, default=8000,
                         help="the port to listen on (default: %(default)s)")
    service.add_argument("--replicas", type=int, default=None,
                         help="model replicas (default: one per GPU, else 1)")
    service.add_argument("--min-replicas", type=int, default=None,
                         help="with --max-replicas: autoscale between these bounds (default: "
                              "no autoscaling)")
    service.add_argument("--max-replicas", type=int, default=None,
                         help="with --min-replicas: the upper bound (default: no autoscaling)")
    service.add_argument("--cpus-per-replica", type=float, default=1.0,
                         help="CPU replicas: CPUs (and torch threads) each "
                              "(default: %(default)s)")
    service.add_argument("--max-batch", type=int, default=16,
                         help="holes one replica denoises in one batch, at most "
                              "(default: %(default)s)")
    service.add_argument("--max-queued", type=int, default=256,
                         help="requests waiting for a replica, at most; past that the service "
                              "answers 429 with Retry-After (default: %(default)s)")
    service.add_argument("--batching", choices=["engine", "serve"], default="engine",
                         help="engine: requests join the engine's step batches as they come; "
                              "serve: Ray Serve's @serve.batch groups them first "
                              "(default: %(default)s)")
    service.add_argument("--address", default=None,
                         help="join this Ray cluster (e.g. auto) instead of starting one "
                              "(default: start one)")
    service.add_argument("--num-cpus", type=int, default=None,
                         help="CPUs for the Ray instance this command starts (default: Ray's "
                              "choice, all of them)")
    service.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                         help="what goes to the log (default: %(default)s)")
    _add_model_args(service)

    pull = commands.add_parser(
        "pull", help="download a model into the Hugging Face cache (the only command that does)")
    pull.add_argument("model", help="a short name from `diffusion-lsp models`, or a Hugging Face "
                                    "repo id (org/name)")
    pull.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")

    models = commands.add_parser("models", help="the supported models and which are on disk")
    models.add_argument("--json", action="store_true", help="one JSON list, for scripts")

    doctor = commands.add_parser(
        "doctor", help="what this machine has, which models are on disk, whether the remote "
                       "answers, and which model to run here")
    doctor.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    _add_quantization_arg(doctor)
    doctor.add_argument("--remote-url", default=None,
                        help="the remote to check (default: the server's remote.url default)")
    doctor.add_argument("--api-key-env", default=None,
                        help="the environment variable holding its key (default: the server's)")
    return parser


def run_doctor(args: argparse.Namespace) -> int:
    """`diffusion-lsp doctor [--json]`: `lsp_server.doctor`'s report, for people or scripts."""
    import json

    import msgspec

    from lsp_server.doctor import describe, diagnose
    from lsp_server.settings import RemoteSettings

    remote = RemoteSettings()
    if args.remote_url is not None:
        remote = msgspec.structs.replace(remote, url=args.remote_url)
    if args.api_key_env is not None:
        remote = msgspec.structs.replace(remote, api_key_env=args.api_key_env)
    # a remote is checked when one is named, or its key is set; else there is none to warn of
    configured = args.remote_url is not None or args.api_key_env is not None or bool(
        os.environ.get(remote.api_key_env))
    report = diagnose(remote if configured else None, args.quantization)
    print(json.dumps(report, indent=2) if args.json else describe(report))
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    """`eval` and `bench NAME` (their code is the checkout's benchmarks/)."""
    if args.command == "eval":
        from benchmarks.humaneval import run_eval

        return run_eval(args)
    if args.command == "bench" and args.name == "lsp":
        from benchmarks.lsp_latency import run_lsp_bench

        return run_lsp_bench(args)
    if args.command == "bench" and args.name == "typing":
        from benchmarks.typing_latency import run_typing_bench

        return run_typing_bench(args)
    if args.command == "bench" and args.name == "multi-hole":
        from benchmarks.multi_hole import run_multi_hole_bench

        return run_multi_hole_bench(args)
    if args.command == "bench" and args.name == "next-edit":
        from benchmarks.next_edit import run_next_edit_bench

        return run_next_edit_bench(args)
    if args.command == "bench" and args.name == "confidence":
        from benchmarks.confidence import run_confidence_bench

        return run_confidence_bench(args)
    if args.command == "bench" and args.name == "quantization":
        from benchmarks.quantization import run_quantization_bench

        return run_quantization_bench(args)
    if args.command == "bench" and args.name == "load":
        from benchmarks.load_test import run_load_bench

        return run_load_bench(args)
    if args.command == "bench" and args.name == "cpu":
        from benchmarks.cpu_profile import run_cpu_bench

        return run_cpu_bench(args)
    if args.command == "bench":
        from benchmarks.model_speed import run_bench

        return run_bench(args)
    return 2


# libraries that warn on import about what they cannot use here (torchao: its CUDA-only
# extensions on a CPU; torch: torchao's enums registered with pytree): said at every start, on
# stderr, to a user who can do nothing about it
QUIET_ON_IMPORT = ("torchao", "torch.utils._pytree")


def quiet_imports() -> None:
    import logging

    for name in QUIET_ON_IMPORT:
        logging.getLogger(name).setLevel(logging.ERROR)


# torch's OpenMP threads spin while they wait for each other (libgomp's default); when another
# program keeps one core busy, a spinning team waits on its slowest thread, sharing that core:
# passive waits took 0.44x the latency of a typed character there, 1.33x idle (docs/benchmarks.md,
# "OpenMP threads wait passively"). Passive is the default; a user's own setting is kept.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}
OPENMP_WAIT_SET_BY = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def calm_openmp() -> None:
    """Passive OpenMP waits unless the user chose (before torch, hence libgomp, is loaded)."""
    if not any(name in os.environ for name in OPENMP_WAIT_SET_BY):
        os.environ.update(OPENMP_WAIT)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_imports()
    calm_openmp()
    if args.command == "serve":
        # a --model that cannot load is said at once, in the terminal, before anything heavy
        # is imported, and the server does not start (a model.path from the editor's settings
        # is reported over LSP, as before)
        from model.catalog.paths import model_problem

        problem = model_problem(args.model) if args.model is not None else None
        if problem is not None:
            print(f"diffusion-lsp serve: error: {problem}", file=sys.stderr)
            return 2
        from lsp_server.main import serve

        return serve(args) or 0
    if args.command == "infill":
        from diffusion_lsp.commands import run_infill

        return run_infill(args)
    if args.command == "demo":
        from diffusion_lsp.commands import run_demo

        return run_demo(args)
    if args.command in NEEDS_BENCHMARKS and not use_benchmarks():
        print(NO_CHECKOUT.format(command=args.command), file=sys.stderr)
        return 2
    if args.command in NEEDS_BENCHMARKS:
        from benchmarks.report import EvalDataMissing
        from model.catalog.paths import ModelLoadError

        try:
            return run_benchmark(args)
        except (EvalDataMissing, ModelLoadError) as error:  # said once: what to do about it
            print(f"diffusion-lsp {args.command}: error: {error}", file=sys.stderr)
            return 1
    if args.command == "service":
        from diffusion_lsp.service import run_service

        return run_service(args)
    if args.command == "pull":
        from diffusion_lsp.hub_commands import run_pull

        return run_pull(args)
    if args.command == "models":
        from diffusion_lsp.hub_commands import run_models

        return run_models(args)
    if args.command == "doctor":
        return run_doctor(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
