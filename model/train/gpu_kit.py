"""Carry a training run back from a borrowed GPU machine, in files of limited size.

Such a machine returns at most 8 files of at most 16 MiB each, and takes at most 64 MiB in
(the working tree included). So `pack` (there) writes the run's last checkpoint with its
weights in float16 and WITHOUT the optimiser state (AdamW's two moments would triple the size;
`model.train.train` resumes from weights alone with a fresh optimiser and a short
re-warm-up), cut into parts of at most PART_BYTES; `join` (here) puts them back together into
a run folder that `--resume` continues and `model.train.export --checkpoint last` exports.

    python -m model.train.gpu_kit pack --run runs/gpu --corpus /tmp/corpus --out "$OUT"
    python -m model.train.gpu_kit join --from FILES_AT --run runs/gpu

OUT then holds `ckpt-last.pt.partNN`, `log.jsonl`, `tokenizer.json` and `kit.json` (the part
list, the checkpoint's sha256, and the corpus statistics the model card reads).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
from pathlib import Path

import torch

from model.train.train import LAST_CHECKPOINT, LOG_FILE, TOKENIZER_FILE

PART_BYTES = 15 << 20  # under the 16 MiB a returned file may have
MAX_FILES = 8  # files a device call returns
SPARE_FILES = 1  # left for the console log of the call
KIT_FILE = "kit.json"
CORPUS_DIR = "corpus"  # join writes the corpus statistics here, for the model card
CARRIED_DTYPE = torch.float16  # the dtype export writes anyway


def weights_only(checkpoint: dict) -> dict:
    """The checkpoint without optimiser state, its floating-point weights in float16. Tied
    weights (embedding and LM head) stay one tensor, saved once."""
    converted: dict[tuple, torch.Tensor] = {}
    model = {}
    for name, tensor in checkpoint["model"].items():
        if not tensor.is_floating_point():
            model[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if key not in converted:
            converted[key] = tensor.to(CARRIED_DTYPE)
        model[name] = converted[key]
    return {**checkpoint, "model": model, "optimizer": None}


def split_bytes(data: bytes, out: Path, stem: str, part_bytes: int = PART_BYTES) -> list[str]:
    """Write `data` as out/stem.part00, .part01, ... of at most `part_bytes`; their names."""
    names = []
    for index, start in enumerate(range(0, max(len(data), 1), part_bytes)):
        name = f"{stem}.part{index:02d}"
        (out / name).write_bytes(data[start:start + part_bytes])
        names.append(name)
    return names


def join_bytes(folder: Path, names: list[str], sha256: str) -> bytes:
    """The parts in order, checked against the sha256 of the whole."""
    data = b"".join((folder / name).read_bytes() for name in names)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"parts {names[0]}... in {folder} do not add up to the packed file "
                         "(a part missing, truncated or from another call)")
    return data


def pack(run: Path, out: Path, corpus: Path | None = None,
         part_bytes: int = PART_BYTES) -> dict:
    """Write the run's last checkpoint (weights only), log and tokenizer into `out`."""
    checkpoint = torch.load(run / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    buffer = io.BytesIO()
    torch.save(weights_only(checkpoint), buffer)
    data = buffer.getvalue()
    parts = -(-len(data) // part_bytes)
    budget = MAX_FILES - SPARE_FILES - 3  # log, tokenizer, kit.json
    if parts > budget:
        raise ValueError(f"{len(data) / 1e6:.0f} MB of weights need {parts} parts; a device "
                         f"call returns {budget} at most beside the rest: train a smaller model")
    out.mkdir(parents=True, exist_ok=True)
    names = split_bytes(data, out, LAST_CHECKPOINT, part_bytes)
    for name in (LOG_FILE, TOKENIZER_FILE):
        shutil.copy(run / name, out / name)
    stats = corpus / "stats.json" if corpus else None
    state = {k: v for k, v in checkpoint["state"].items() if k != "rng"}
    kit = {"parts": names, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
           "state": state,
           "corpus_stats": json.loads(stats.read_text()) if stats and stats.exists() else None}
    (out / KIT_FILE).write_text(json.dumps(kit, indent=2) + "\n")
    return kit


def join(source: Path, run: Path) -> dict:
    """Rebuild a run folder from the files `pack` wrote; replaces its checkpoint and log."""
    kit = json.loads((source / KIT_FILE).read_text())
    data = join_bytes(source, kit["parts"], kit["sha256"])
    run.mkdir(parents=True, exist_ok=True)
    temporary = run / (LAST_CHECKPOINT + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(run / LAST_CHECKPOINT)
    for name in (LOG_FILE, TOKENIZER_FILE):
        shutil.copy(source / name, run / name)
    if kit.get("corpus_stats") is not None:
        (run / CORPUS_DIR).mkdir(exist_ok=True)
        (run / CORPUS_DIR / "stats.json").write_text(json.dumps(kit["corpus_stats"], indent=2))
    return kit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="on the GPU machine: run folder -> OUT")
    packing.add_argument("--run", required=True, type=Path)
    packing.add_argument("--out", required=True, type=Path)
    packing.add_argument("--corpus", type=Path, default=None, help="its stats.json is carried")
    joining = commands.add_parser("join", help="here: the returned files -> run folder")
    joining.add_argument("--from", dest="source", required=True, type=Path)
    joining.add_argument("--run", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        kit = pack(args.run, args.out, args.corpus)
        print(f"packed {args.run}/{LAST_CHECKPOINT} (step {kit['state']['step']}, weights only, "
              f"{kit['bytes'] / 1e6:.1f} MB in {len(kit['parts'])} parts) into {args.out}")
    else:
        kit = join(args.source, args.run)
        print(f"joined {len(kit['parts'])} parts into {args.run}/{LAST_CHECKPOINT} (step "
              f"{kit['state']['step']}); export with: python -m model.train.export --run "
              f"{args.run} --checkpoint last --corpus {args.run}/{CORPUS_DIR} --out DIR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
