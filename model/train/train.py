"""Train the bundled model: a small bidirectional Qwen2-shaped masked-diffusion code model.

Objective (LLaDA, Nie et al., 2025; MDLM, Sahoo et al., 2024): for each example draw a mask
ratio t ~ U(eps, 1), replace every eligible position (the hole: text and end-of-hole
padding; the whole window for plain examples) by `<|mask|>` with probability t, and minimise
the cross-entropy on the masked positions weighted by 1/t, averaged over eligible positions.
The network is stock `Qwen2ForCausalLM` with attention made bidirectional
(`model.network.loader.make_bidirectional`); logits are not shifted (position i predicts token i).

Runs are resumable (`--resume`; from weights alone too, as `model.train.gpu_kit` carries them,
with a fresh optimiser and a re-warm-up), bounded in time (`--minutes`), and log validation
loss to `RUN/log.jsonl`. On CUDA: bf16 autocast and SDPA (flash) attention.

    python -m model.train.train --data runs/data --tokenizer runs/tokenizer.json \
        --run runs/preview --minutes 60 --threads 1 [--resume]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM

from model.network.loader import make_bidirectional
from model.train.data import ExampleShape, LayoutIds, load_stream, make_batch

LAST_CHECKPOINT = "ckpt-last.pt"
BEST_CHECKPOINT = "ckpt-best.pt"
LOG_FILE = "log.jsonl"
TOKENIZER_FILE = "tokenizer.json"
VALIDATION_SEED = 1234  # the validation batches are the same at every evaluation


@dataclass
class ModelShape:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass
class TrainConfig:
    model: ModelShape = field(default_factory=ModelShape)
    shape: ExampleShape = field(default_factory=ExampleShape)
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 0.05  # t ~ U(eps, 1): the 1/t weight stays below 1/eps
    total_minutes: float = 60.0  # the learning-rate schedule spans this much training time
    max_steps: int | None = None  # or this many steps, when given
    eval_every_s: float = 120.0
    save_every_s: float = 300.0
    validation_batches: int = 4
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Network


def build_network(vocab_size: int, shape: ModelShape, ids: LayoutIds,
                  device: torch.device) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=vocab_size, bos_token_id=ids.bos, eos_token_id=ids.eos,
                         pad_token_id=ids.end_of_hole, use_cache=False,
                         attn_implementation="sdpa", **asdict(shape))
    config.is_causal = False
    network = Qwen2ForCausalLM(config)
    make_bidirectional(network)
    return network.to(device)


@torch.no_grad()
def check_bidirectional(network: Qwen2ForCausalLM, vocab_size: int,
                        device: torch.device) -> None:
    """Raise unless the first position sees the last token: a transformers version that
    ignored `is_causal = False` would silently train a causal model."""
    ids = torch.arange(8, device=device)[None] % vocab_size  # (1, 8)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab_size
    first = network.model(input_ids=torch.cat([ids, changed])).last_hidden_state[:, 0]
    if torch.allclose(first[0], first[1]):
        raise RuntimeError("attention is causal: position 0 ignores the last token "
                           "(model.network.loader.make_bidirectional no longer works here)")


def hf_config_dict(network: Qwen2ForCausalLM) -> dict:
    """config.json contents for the loader (family `default`)."""
    raw = network.config.to_dict()
    raw["diffusion_lsp_family"] = "default"
    raw["is_causal"] = False
    raw.pop("_attn_implementation_autoset", None)
    return raw


# ---------------------------------------------------------------------------------------------
# Objective


def mask_batch(clean: torch.Tensor, eligible: torch.Tensor, mask_id: int, eps: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise a batch. clean, eligible: (B, L). Returns noised ids (B, L), masked (B, L) bool,
    t (B,). Every row gets at least one masked position."""
    batch, length = clean.shape
    t = eps + (1 - eps) * torch.rand(batch, generator=generator)  # (B,)
    draws = torch.rand(batch, length, generator=generator)  # (B, L)
    masked = eligible & (draws < t[:, None])
    # a row with nothing masked masks its eligible position with the smallest draw
    empty = ~masked.any(dim=1)
    if empty.any():
        forced = torch.where(eligible, draws, torch.full_like(draws, 2.0)).argmin(dim=1)
        masked[empty, forced[empty]] = True
    noised = torch.where(masked, torch.full_like(clean, mask_id), clean)
    return noised, masked, t


def diffusion_loss(network: Qwen2ForCausalLM, clean: torch.Tensor, noised: torch.Tensor,
                   masked: torch.Tensor, eligible: torch.Tensor,
                   t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss, plain mean cross-entropy on masked tokens).

    The LM head runs on the masked positions only: with a small model the vocabulary
    projection would otherwise cost as much as the whole transformer.
    """
    hidden = network.model(input_ids=noised).last_hidden_state  # (B, L, H)
    logits = network.lm_head(hidden[masked]).float()  # (M, V)
    token_loss = F.cross_entropy(logits, clean[masked], reduction="none")  # (M,)
    rows = masked.nonzero()[:, 0]  # (M,) which example each masked position belongs to
    per_row = torch.zeros(clean.shape[0], device=clean.device).index_add_(0, rows, token_loss)
    weighted = per_row / t / eligible.sum(dim=1).clamp_min(1)  # (B,)
    return weighted.mean(), token_loss.mean()


def learning_rate(config: TrainConfig, step: int, progress: float, warm_from: int = 0) -> float:
    """Linear warm-up over `warmup_steps` from `warm_from` (the step the optimiser started
    at: 0, or a resume from weights alone), then cosine decay to min_lr_ratio over
    `progress` in [0, 1]. A re-warm-up climbs to the cosine's value, not to the peak."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    scheduled = config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)
    warm = step - warm_from
    if warm < config.warmup_steps:
        return scheduled * (warm + 1) / config.warmup_steps
    return scheduled


# ---------------------------------------------------------------------------------------------
# Validation


def validation_set(stream: np.ndarray, config: TrainConfig,
                   ids: LayoutIds) -> list[tuple[torch.Tensor, ...]]:
    """Fixed noised batches: the same examples and masks at every evaluation."""
    rng = np.random.default_rng(VALIDATION_SEED)
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    batches = []
    for _ in range(config.validation_batches):
        clean, eligible = make_batch(stream, config.batch_size, config.shape, ids, rng)
        clean_t, eligible_t = torch.from_numpy(clean), torch.from_numpy(eligible)
        noised, masked, t = mask_batch(clean_t, eligible_t, ids.mask, config.eps, generator)
        batches.append((clean_t, noised, masked, eligible_t, t))
    return batches


@torch.no_grad()
def evaluate(network: Qwen2ForCausalLM, batches: list, device: torch.device) -> dict:
    network.eval()
    weighted, plain = [], []
    for batch in batches:
        clean, noised, masked, eligible, t = (x.to(device) for x in batch)
        with autocast(device):
            loss, ce = diffusion_loss(network, clean, noised, masked, eligible, t)
        weighted.append(loss.item())
        plain.append(ce.item())
    network.train()
    return {"val_loss": float(np.mean(weighted)), "val_masked_ce": float(np.mean(plain))}


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights and optimiser stay float32); none on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, network, optimizer, state: dict, config: TrainConfig,
                    vocab_size: int) -> None:
    payload = {"model": network.state_dict(), "optimizer": optimizer.state_dict(),
               "state": state, "config": asdict(config), "vocab_size": vocab_size,
               "hf_config": hf_config_dict(network)}
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def config_from_dict(raw: dict) -> TrainConfig:
    raw = dict(raw)
    model = ModelShape(**raw.pop("model"))
    shape = raw.pop("shape")
    shape["kind_weights"] = tuple(shape["kind_weights"])
    return TrainConfig(model=model, shape=ExampleShape(**shape), **raw)


def resumed_config(saved: TrainConfig, given: TrainConfig,
                   overrides: tuple[str, ...]) -> TrainConfig:
    return replace(saved, **{name: getattr(given, name) for name in overrides})


# ---------------------------------------------------------------------------------------------
# The loop


def train(data: Path, tokenizer_file: Path, run: Path, config: TrainConfig, minutes: float,
          device: torch.device, resume: bool = False, progress_bar: bool = True,
          overrides: tuple[str, ...] = ("max_steps", "eval_every_s", "save_every_s")) -> dict:
    """Train until `minutes` of wall time pass (or max_steps); returns the final state.

    On resume the network shape, data shape and optimiser settings come from the
    checkpoint; the fields named in `overrides` come from `config`.
    """
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids = LayoutIds.from_tokenizer(tokenizer)
    if not (run / TOKENIZER_FILE).exists():
        shutil.copy(tokenizer_file, run / TOKENIZER_FILE)
    train_stream = load_stream(data / "train.bin")
    valid_stream = load_stream(data / "validation.bin")

    checkpoint = None
    if resume and (run / LAST_CHECKPOINT).exists():
        checkpoint = torch.load(run / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
        config = resumed_config(config_from_dict(checkpoint["config"]), config, overrides)
    vocab_size = tokenizer.get_vocab_size()
    torch.manual_seed(config.seed)
    network = build_network(vocab_size, config.model, ids, device)
    decay = [p for n, p in network.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in network.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "best_val": float("inf"),
             "rng": None}
    warm_from = 0  # the step this optimiser's state starts at
    if checkpoint is not None:
        network.load_state_dict(checkpoint["model"])  # float16 weights (gpu_kit) are upcast
        state = checkpoint["state"]
        if checkpoint.get("optimizer") is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
        else:  # weights alone (model.train.gpu_kit): fresh moments, so warm up again
            warm_from = state["step"]
    check_bidirectional(network, vocab_size, device)
    rng = np.random.default_rng([config.seed, state["step"]])
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + state["step"])
    validation = validation_set(valid_stream, config, ids)
    parameters = sum(p.numel() for p in network.parameters())

    def log(record: dict) -> None:
        with (run / LOG_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def progress() -> float:
        if config.max_steps:
            return state["step"] / config.max_steps
        return state["train_seconds"] / (config.total_minutes * 60)

    def next_batch() -> tuple[torch.Tensor, ...]:
        """(clean, noised, masked, eligible, t) on the CPU."""
        clean, eligible = make_batch(train_stream, config.batch_size, config.shape, ids, rng)
        clean_t, eligible_t = torch.from_numpy(clean), torch.from_numpy(eligible)
        noised, masked, t = mask_batch(clean_t, eligible_t, ids.mask, config.eps, generator)
        return clean_t, noised, masked, eligible_t, t

    batch = next_batch()
    bar = None
    if progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=state["step"], unit="step",
                   dynamic_ncols=True, mininterval=5)
    log({"event": "start", "step": state["step"], "parameters": parameters,
         "device": str(device), "threads": torch.get_num_threads(), "resumed": checkpoint
         is not None, "config": asdict(config)})
    began = time.perf_counter()
    last_eval = last_save = began
    session_seconds_at_start = state["train_seconds"]
    smoothed = None
    network.train()
    interrupted = []  # SIGINT (`timeout --signal=INT` in scripts/gpu-train.sh) ends the loop
    main_thread = threading.current_thread() is threading.main_thread()  # signals go there
    previous_handler = (signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
                        if main_thread else None)
    while not interrupted:
        now = time.perf_counter()
        if now - began >= minutes * 60:
            break
        if config.max_steps is not None and state["step"] >= config.max_steps:
            break
        lr = learning_rate(config, state["step"], progress(), warm_from)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clean_t, noised, masked, eligible_t, t = (
            x.to(device, non_blocking=True) for x in batch)
        with autocast(device):
            loss, ce = diffusion_loss(network, clean_t, noised, masked, eligible_t, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
        optimizer.step()
        state["step"] += 1
        state["tokens"] += clean_t.numel()
        batch = next_batch()  # on the CPU while a GPU still computes this step
        state["train_seconds"] = session_seconds_at_start + time.perf_counter() - began
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.3f}", ce=f"{ce.item():.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{state['tokens'] / max(state['train_seconds'], 1e-9):.0f}",
                            refresh=False)
        now = time.perf_counter()
        if now - last_eval >= config.eval_every_s:
            _eval_and_log(network, validation, device, state, smoothed, lr, log, run,
                          optimizer, config, vocab_size)
            last_eval = time.perf_counter()
        if now - last_save >= config.save_every_s:
            save_checkpoint(run / LAST_CHECKPOINT, network, optimizer, state, config, vocab_size)
            last_save = time.perf_counter()
    if main_thread:
        signal.signal(signal.SIGINT, previous_handler)
    if interrupted:
        log({"event": "interrupted", "step": state["step"]})
    _eval_and_log(network, validation, device, state, smoothed, lr_of(optimizer), log, run,
                  optimizer, config, vocab_size)
    save_checkpoint(run / LAST_CHECKPOINT, network, optimizer, state, config, vocab_size)
    if bar is not None:
        bar.close()
    log({"event": "stop", "step": state["step"], "tokens": state["tokens"],
         "train_seconds": state["train_seconds"]})
    return state


def lr_of(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _eval_and_log(network, validation, device, state, smoothed, lr, log, run, optimizer,
                  config, vocab_size) -> None:
    metrics = evaluate(network, validation, device)
    log({"event": "eval", "step": state["step"], "tokens": state["tokens"],
         "train_seconds": round(state["train_seconds"], 1), "train_loss": smoothed, "lr": lr,
         **metrics})
    if metrics["val_loss"] < state["best_val"]:
        state["best_val"] = metrics["val_loss"]
        save_checkpoint(run / BEST_CHECKPOINT, network, optimizer, state, config, vocab_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="folder with train.bin etc.")
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--run", required=True, type=Path, help="checkpoints and log go here")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time of this run")
    parser.add_argument("--total-minutes", type=float, default=None,
                        help="training time the LR schedule spans, over all resumes "
                             "(default: --minutes)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 3 x hidden")
    parser.add_argument("--eval-every", type=float, default=120.0, help="seconds")
    parser.add_argument("--save-every", type=float, default=300.0, help="seconds")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from model.network.loader import pick_device

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = TrainConfig(
        model=ModelShape(hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.intermediate or 3 * args.hidden),
        shape=ExampleShape(seq_len=args.seq_len),
        batch_size=args.batch_size, lr=args.lr,
        total_minutes=args.total_minutes or args.minutes, max_steps=args.max_steps,
        eval_every_s=args.eval_every, save_every_s=args.save_every)
    overrides = ("max_steps", "eval_every_s", "save_every_s")
    if args.total_minutes is not None:
        overrides += ("total_minutes",)
    state = train(args.data, args.tokenizer, args.run, config, args.minutes, device,
                  resume=args.resume, progress_bar=not args.no_progress, overrides=overrides)
    print(json.dumps({k: v for k, v in state.items() if k != "rng"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
