"""Export a training run as a model directory the loader finds: the bundled model.

Writes, into `--out` (default `model/bundled`):

    config.json       the checkpoint's Qwen2 config, marked `diffusion_lsp_family: default`
    model.safetensors the weights in float16 (tied embeddings: no separate lm_head)
    tokenizer.json    the run's tokenizer
    train_log.json    the run's sessions and validation records (the loss curve), and the
                      checkpoint's training state (steps, tokens seen, seconds)
    MODEL_CARD.md     data, size, training compute, measured quality, limits

and a PNG of the validation loss curve (default `benchmarks/results/training-loss.png`).
The card reads the corpus statistics and, when present, the HumanEval-infilling results under
`benchmarks/results/`; `--card-only` rewrites just the card (after an eval, say).

    python -m model.train.export --run runs/preview [--checkpoint best|last] --out model/bundled
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.network.loader import BUNDLED_DIR, CONFIG_FILE, TOKENIZER_FILE
from model.train.train import BEST_CHECKPOINT, LAST_CHECKPOINT, LOG_FILE

REPO = Path(__file__).resolve().parents[2]
WEIGHTS_FILE = "model.safetensors"
TRAIN_LOG_FILE = "train_log.json"
CARD_FILE = "MODEL_CARD.md"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_PLOT = RESULTS / "training-loss.png"
DEFAULT_CORPUS = REPO / "runs" / "corpus"
EVAL_RESULTS = {split: RESULTS / f"eval-humaneval-{split}.json"
                for split in ("single-line", "multi-line")}
CHECKPOINTS = {"best": BEST_CHECKPOINT, "last": LAST_CHECKPOINT}
EXPORT_DTYPE = torch.float16
# config.json keys that only describe a training-time object, not the network
DROPPED_CONFIG_KEYS = ("id2label", "label2id", "_name_or_path", "architectures", "problem_type",
                       "output_hidden_states", "output_attentions", "return_dict",
                       "chunk_size_feed_forward", "is_encoder_decoder")


# ---------------------------------------------------------------------------------------------
# Reading a run


def load_checkpoint(run: Path, which: str = "best") -> dict:
    if which not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {which!r}; known: {', '.join(CHECKPOINTS)}")
    path = run / CHECKPOINTS[which]
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path}: has the run saved one yet?")
    return torch.load(path, map_location="cpu", weights_only=False)


def read_log(run: Path) -> list[dict]:
    path = run / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def weights_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing the model directory


def export_config(checkpoint: dict) -> dict:
    """config.json for the loader: family `default`, bidirectional, float16 weights."""
    config = {k: v for k, v in checkpoint["hf_config"].items() if k not in DROPPED_CONFIG_KEYS}
    config["diffusion_lsp_family"] = "default"
    config["is_causal"] = False
    config["use_cache"] = False
    config["dtype"] = str(EXPORT_DTYPE).removeprefix("torch.")
    return config


def export_weights(checkpoint: dict, path: Path) -> int:
    """float16 safetensors; with tied embeddings lm_head is the embedding, so it is left out.
    Returns the number of parameters written."""
    tied = checkpoint["hf_config"].get("tie_word_embeddings", False)
    state = {name: tensor.detach().to(EXPORT_DTYPE).contiguous()
             for name, tensor in checkpoint["model"].items()
             if not (tied and name == "lm_head.weight")}
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes 0600; the file ships in the package
    return sum(t.numel() for t in state.values())


def training_summary(checkpoint: dict, log: list[dict], which: str, run: Path) -> dict:
    """What train_log.json holds: the run's sessions, its validation curve, the state exported."""
    state = {k: v for k, v in checkpoint["state"].items() if k != "rng"}
    sessions = [{k: r.get(k) for k in ("step", "device", "threads", "resumed", "parameters")}
                for r in log if r.get("event") == "start"]
    return {
        "run": run.name, "checkpoint": which, "state": state,
        "config": checkpoint["config"], "sessions": sessions,
        "evals": [r for r in log if r.get("event") == "eval"],
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def plot_loss(summary: dict, path: Path) -> Path | None:
    """Validation (and smoothed training) loss against tokens seen."""
    evals = summary["evals"]
    if not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tokens = [r["tokens"] / 1e6 for r in evals]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tokens, [r["val_loss"] for r in evals], "o-", label="validation loss (1/t weighted)")
    train = [(x, r["train_loss"]) for x, r in zip(tokens, evals, strict=True)
             if r.get("train_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), "--", label="training loss (smoothed)")
    ax.plot(tokens, [r["val_masked_ce"] for r in evals], ":", label="validation masked-token CE")
    exported = summary["state"]["step"]
    ax.axvline(summary["state"]["tokens"] / 1e6, color="grey", lw=0.8,
               label=f"exported ({summary['checkpoint']}, step {exported})")
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"bundled model training ({summary['run']})")
    ax.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export(run: Path, out: Path, which: str = "best", plot: Path | None = DEFAULT_PLOT,
           corpus: Path | None = DEFAULT_CORPUS) -> dict:
    """Write the model directory `out` from `run`; returns the training summary."""
    checkpoint = load_checkpoint(run, which)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(export_config(checkpoint), indent=2) + "\n")
    parameters = export_weights(checkpoint, out / WEIGHTS_FILE)
    tokenizer = run / TOKENIZER_FILE
    if not tokenizer.exists():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {run}")
    shutil.copy(tokenizer, out / TOKENIZER_FILE)
    summary = training_summary(checkpoint, read_log(run), which, run)
    summary["parameters"] = parameters
    (out / TRAIN_LOG_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    picture = plot_loss(summary, plot) if plot is not None else None
    write_card(out, corpus, picture)
    return summary


# ---------------------------------------------------------------------------------------------
# The model card


def _eval_line(split: str, out: Path) -> str:
    path = EVAL_RESULTS[split]
    if not path.exists():
        return f"| {split} | not measured yet | | | | |"
    result = json.loads(path.read_text())
    summary = result["summary"]
    sha = weights_sha256(out / WEIGHTS_FILE) if (out / WEIGHTS_FILE).exists() else None
    note = "" if result.get("model_sha256") == sha else " (an earlier export)"
    tasks = summary["tasks"]
    scope = f"{tasks} of {summary['records_in_split']}"
    empty = summary.get("empty_completions")
    empty_share = "" if empty is None else f"{empty / max(tasks, 1) * 100:.0f}%"
    return (f"| {split} | {summary['pass_at_1'] * 100:.1f}%{note} | "
            f"{summary['exact_match'] * 100:.1f}% | {empty_share} | {scope} | "
            f"{summary['latency_p50_ms']:.0f} ms, {summary['steps_p50']:g} steps |")


def _card_corpus_lines(card: Path) -> list[str]:
    """The corpus bullets of an existing card's Data section (none when there is no card)."""
    if not card.exists():
        return []
    data = card.read_text().split("## Data", 1)[-1].split("\n## ", 1)[0]
    return [line for line in data.splitlines() if line.startswith("- ")]


def _corpus_lines(corpus: Path | None, card: Path) -> list[str]:
    """Corpus bullets from `corpus`/stats.json; without it (a fresh checkout rewriting the card
    after an eval), those of the card already there."""
    stats_file = corpus / "stats.json" if corpus else None
    if stats_file is None or not stats_file.exists():
        return _card_corpus_lines(card) or ["- corpus statistics not available at export time"]
    stats = json.loads(stats_file.read_text())
    files, size = stats["files"], stats["bytes"]
    dropped = ", ".join(f"{v:,} {k}" for k, v in stats.get("dropped", {}).items())
    licences = ", ".join(f"{k} ({v:,})" for k, v in list(stats["licenses_top"].items())[:6])
    return [
        f"- {files.get('train', 0):,} training files ({size.get('train', 0) / 1e6:.0f} MB) and "
        f"{files.get('validation', 0):,} validation files "
        f"({size.get('validation', 0) / 1e6:.1f} MB), split by file hash",
        f"- dropped: {dropped}",
        f"- most common licences (files): {licences}",
    ]


def card_text(out: Path, corpus: Path | None, plot: Path | None) -> str:
    summary = json.loads((out / TRAIN_LOG_FILE).read_text())
    config = json.loads((out / CONFIG_FILE).read_text())
    state, train_config = summary["state"], summary["config"]
    sessions = summary["sessions"] or [{}]
    device = sessions[-1].get("device", "?")
    threads = sessions[-1].get("threads", "?")
    evals = summary["evals"]
    last_eval = evals[-1] if evals else {}
    nan = float("nan")
    size_mb = (out / WEIGHTS_FILE).stat().st_size / 1e6
    shape = train_config["shape"]
    plot_ref = ""
    if plot is not None:
        try:
            plot_ref = f"\n![validation loss](../../{plot.resolve().relative_to(REPO)})\n"
        except ValueError:
            plot_ref = f"\nLoss curve: `{plot}`\n"
    lines = [
        "# diffusion-lsp bundled model — PREVIEW",
        "",
        "> **PREVIEW.** Trained for a short while on a 2-core CPU to build and check the whole "
        "pipeline (corpus → tokenizer → training → export → eval). It is weak: expect "
        "plausible-looking tokens, rarely correct code. The GPU run the project plans (a "
        "~20–60M model, ~1B tokens) is still owed; this file is regenerated by "
        "`python -m model.train.export` when it lands.",
        "",
        "## What it is",
        "",
        "- A bidirectional masked-diffusion code model: stock `Qwen2ForCausalLM` with "
        "attention made non-causal, logits not shifted (family `default`).",
        f"- {summary['parameters']:,} parameters ({config['num_hidden_layers']} layers, hidden "
        f"{config['hidden_size']}, {config['num_attention_heads']} heads / "
        f"{config['num_key_value_heads']} KV heads, MLP {config['intermediate_size']}), "
        f"tied embeddings; vocabulary {config['vocab_size']:,} (byte-level BPE with newlines "
        f"split off); weights float16, {size_mb:.1f} MB.",
        f"- Trained on sequences of {shape['seq_len']} tokens: `<|bos|> prefix hole suffix "
        f"<|eos|>`, the hole padded with `<|endofhole|>` (variable length). Longer contexts "
        f"than that were never seen.",
        "",
        "## Data",
        "",
        "Python source already on the training machine: the interpreter's standard library and "
        "installed site-packages, collected by `model/train/corpus.py` (deduplicated by content "
        "hash; generated, huge, minified and unreadable files dropped; any file mentioning "
        "HumanEval dropped).",
        "",
        *_corpus_lines(corpus, out / CARD_FILE),
        "",
        "## Training",
        "",
        "Masked diffusion (LLaDA / MDLM): mask ratio t ~ U(0.05, 1), cross-entropy on masked "
        "tokens weighted by 1/t. Examples are completion-shaped (one line, several lines, the "
        "rest of a line, a random span; the hole padded with end-of-hole tokens) or plain "
        f"masked windows, in proportions {shape['kind_weights']} "
        "(line, lines, line-rest, span, plain).",
        "",
        f"- compute: {device.upper()}, {threads} torch thread{'s' if threads != 1 else ''}, "
        f"{state['train_seconds'] / 60:.0f} minutes of training",
        f"- steps: {state['step']:,} at batch {train_config['batch_size']} × {shape['seq_len']} "
        f"tokens; tokens seen: {state['tokens'] / 1e6:.1f}M (whole sequences, masked or not)",
        f"- optimiser: AdamW, peak LR {train_config['lr']}, warm-up "
        f"{train_config['warmup_steps']} steps, cosine to {train_config['min_lr_ratio']}× over "
        f"{train_config['total_minutes']:.0f} minutes, weight decay "
        f"{train_config['weight_decay']}",
        f"- exported checkpoint: `{summary['checkpoint']}` of run `{summary['run']}`, "
        f"validation loss {state['best_val']:.3f} (best); last logged: step "
        f"{last_eval.get('step', '?')}, validation loss {last_eval.get('val_loss', nan):.3f}, "
        f"masked-token CE {last_eval.get('val_masked_ce', nan):.3f}",
        plot_ref,
        "## Measured quality and speed",
        "",
        "HumanEval-infilling (`diffusion-lsp eval humaneval-infilling`), one greedy sample per "
        "task, programs run in a subprocess with a time limit. Latency: one infill alone "
        "through the engine, tokenizing included, on the machine named in the result JSON "
        "(`benchmarks/results/eval-humaneval-*.json`).",
        "",
        "| split | pass@1 | exact match | empty completions | tasks | latency p50, steps p50 |",
        "|---|---|---|---|---|---|",
        _eval_line("single-line", out),
        _eval_line("multi-line", out),
        "",
        "An empty completion still passes the few tasks whose missing lines the tests never "
        "reach, so a model that writes nothing scores a little above zero.",
        "",
        "For scale: published single-line pass@1 of Open-dCoder-0.5B is 32.5%, "
        "Dream-Coder-7B 55.3%.",
        "",
        "## Limits",
        "",
        "- PREVIEW quality: trained for minutes on one CPU thread; it has learnt token "
        "statistics and some syntax, not programming.",
        "- Python only; contexts beyond the training length are cut by the caller.",
        "- The corpus is whatever was installed on one machine; licences are those of the "
        "packages (listed per file in the corpus manifest, `runs/corpus/manifest.jsonl`).",
        "- For useful completions today, point the server at a published diffusion code model "
        "(`--model` with Dream-Coder, DiffuCoder, DreamOn or LLaDA weights, on a GPU).",
        "",
        "## Reproduce",
        "",
        "```sh",
        "python -m model.train.corpus --out runs/corpus",
        "python -m model.train.tokenizer --corpus runs/corpus --out runs/tokenizer.json",
        "python -m model.train.data --corpus runs/corpus --tokenizer runs/tokenizer.json "
        "--out runs/data --max-train-tokens 40000000",
        f"python -m model.train.train --data runs/data --tokenizer runs/tokenizer.json "
        f"--run runs/preview --minutes {train_config['total_minutes']:.0f} --threads "
        f"{threads} --batch-size {train_config['batch_size']} --seq-len {shape['seq_len']} "
        f"--lr {train_config['lr']} --eval-every {train_config['eval_every_s']:g} "
        f"--save-every {train_config['save_every_s']:g}",
        "python -m model.train.export --run runs/preview --out model/bundled",
        "diffusion-lsp eval humaneval-infilling --split single-line",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(out: Path, corpus: Path | None = DEFAULT_CORPUS, plot: Path | None = None) -> Path:
    path = out / CARD_FILE
    path.write_text(card_text(out, corpus, plot))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="training run folder (checkpoints, log.jsonl)")
    parser.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="best")
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT,
                        help="PNG of the validation loss curve")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="corpus folder (its stats.json goes into the card)")
    parser.add_argument("--card-only", action="store_true",
                        help="rewrite MODEL_CARD.md of --out from the files already there")
    args = parser.parse_args(argv)
    if args.card_only:
        plot = args.plot if args.plot.exists() else None
        print(f"wrote {write_card(args.out, args.corpus, plot)}")
        return 0
    if args.run is None:
        parser.error("--run is required (unless --card-only)")
    summary = export(args.run, args.out, args.checkpoint, args.plot, args.corpus)
    state = summary["state"]
    print(f"exported {args.run}/{CHECKPOINTS[args.checkpoint]} (step {state['step']}, "
          f"{state['tokens'] / 1e6:.1f}M tokens, {summary['parameters']:,} parameters) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
