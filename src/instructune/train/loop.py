"""The training loop: AdamW, warm-up then linear decay, completion-only loss, validation loss, JSON-lines log."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import InstructuneError
from ..prompts.format import Encoded
from .collate import (attention_window, collate, completion_loss_sum, length_grouped_batches, split_by_tokens,
                      takes_4d_mask)


def autocast(bf16: bool, device: torch.device):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def grouped_kv_heads(device: torch.device):
    """On a CPU, let torch's attention read grouped key/value heads directly.

    With an attention mask (padding), transformers copies each key/value head once per query head it serves
    (`repeat_kv`) before calling `scaled_dot_product_attention`, because some GPU kernels fall back to slow paths
    with masked grouped-query attention. torch's CPU kernel takes them as they are (`enable_gqa`): the same result,
    with fewer copies to compute, keep for the backward pass and free (SmolLM2-135M trains about 1.2x faster). The
    switch is transformers' own, read at each call, and restored afterwards; GPUs keep transformers' choice."""
    import os

    if device.type != "cpu":
        yield
        return
    key, before = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@torch.no_grad()
def validation_loss(model, examples: list[Encoded], pad_id: int, batch_size: int, bf16: bool = False) -> float:
    """Mean cross-entropy per completion token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = _to(collate([examples[i] for i in order[start:start + batch_size]], pad_id), device)
        with autocast(bf16, device):
            total += completion_loss_sum(model, batch).item()
        count += batch["n_supervised"]
    model.train(was_training)
    return total / max(count, 1)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(model, train_set: list[Encoded], val_set: list[Encoded], cfg: TrainConfig, pad_id: int, seed: int,
          log_path: Path | None = None, checkpoint_dir: Path | None = None, resume: bool = False,
          tensorboard_dir: Path | None = None, score_fn=None) -> list[dict]:
    """Supervised fine-tuning on completion tokens; returns the log (one dict per optimizer step).

    Each optimizer step takes `batch_size * grad_accum` examples grouped by length and splits them into
    `grad_accum` micro-batches, and a micro-batch of long examples further into passes of at most `pass_tokens`
    padded tokens; the loss is normalised by the supervised tokens of the whole step, so accumulation (and
    splitting) gives the same update as one big batch. With `checkpoint_dir`, a checkpoint (trainable weights, optimizer,
    scheduler, RNG, data position) is written atomically every `save_every` steps; `resume` continues from it
    exactly, and the log is cut back to the checkpoint's step.

    At each validation, `score_fn(model) -> float` (higher is better; e.g. the task metric by generation on a fixed
    validation subsample) is logged as `val_metric`; it (or else the validation loss) decides the best step, early
    stopping after `early_stopping_patience` validations without improvement, and, with `keep_best`, which
    weights the model ends with."""
    with grouped_kv_heads(next(model.parameters()).device):
        return _train(model, train_set, val_set, cfg, pad_id, seed, log_path, checkpoint_dir, resume, tensorboard_dir,
                      score_fn)


def _train(model, train_set, val_set, cfg, pad_id, seed, log_path, checkpoint_dir, resume, tensorboard_dir,
           score_fn) -> list[dict]:
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    rank, world = distributed()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
    if rank:
        log_path = None  # one log, one progress bar, one checkpoint: process 0's
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    window, fused = attention_window(model), takes_4d_mask(model)
    # the fused kernel updates all (LoRA: hundreds of small) tensors in one pass: ~4x faster steps than foreach on a CPU
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in params))
    lengths = [len(e.input_ids) for e in train_set]
    supervised = [e.n_supervised for e in train_set]
    per_step = cfg.batch_size * cfg.grad_accum * world  # the global batch
    steps_per_epoch = math.ceil(len(train_set) / per_step)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = int(total_steps * cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    eval_every = cfg.eval_every or steps_per_epoch
    step, tokens, elapsed_before = 0, 0, 0.0
    best: dict = {"score": None, "step": 0, "bad": 0}
    best_weights = None
    log: list[dict] = []
    if resume and checkpoint_dir is not None and (checkpoint_dir / "state.pt").is_file():
        state = load_checkpoint(checkpoint_dir, named, optimizer, scheduler)
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        best = state.get("best", best)
        if (checkpoint_dir / "best.safetensors").is_file():
            from safetensors.torch import load_file

            best_weights = load_file(str(checkpoint_dir / "best.safetensors"))
        if log_path and log_path.is_file():
            log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            log = [e for e in log if e["step"] <= step]
            log_path.write_text("".join(json.dumps(e) + "\n" for e in log))
    elif log_path:
        log_path.unlink(missing_ok=True)
    log_file = open(log_path, "a", encoding="utf-8") if log_path else None
    board = None
    if tensorboard_dir is not None and rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        board = SummaryWriter(str(tensorboard_dir), purge_step=step + 1 if resume else None)

    def record(entry: dict) -> None:
        log.append(entry)
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
        if board:
            for key in ("loss", "val_loss", "lr", "tokens_per_s"):
                if key in entry:
                    board.add_scalar(f"train/{key}", entry[key], entry["step"])

    model.train()
    started = time.perf_counter() - elapsed_before
    bar = tqdm(total=total_steps, initial=step, desc="fine-tuning", unit="step", dynamic_ncols=True, disable=rank > 0)
    stopped = False
    while step < total_steps and not stopped:
        epoch, position = divmod(step, steps_per_epoch)
        groups = length_grouped_batches(lengths, per_step, seed + epoch)  # the data order is a function of the step
        for group in groups[position:]:
            if step >= total_steps:
                break
            # normalise over the whole step (all micro-batches of all processes): accumulation = one big batch
            n_supervised = sum(supervised[i] for i in group)
            mine, weight = group[rank::world], float(world)  # DDP averages gradients over processes: undo it
            if not mine:  # a short last step: this process still joins the gradient all-reduce, with zero weight
                mine, weight = group[:1], 0.0
            # micro-batches of batch_size, each split further into passes of at most pass_tokens (long examples)
            passes = [part for j in range(0, len(mine), cfg.batch_size)
                      for part in split_by_tokens(mine[j:j + cfg.batch_size], lengths, cfg.pass_tokens)]
            micro = [_to(collate([train_set[i] for i in part], pad_id, cfg.packing, cfg.share_prefix, window, fused), device)
                     for part in passes]
            loss_value, step_tokens = 0.0, 0
            for j, m in enumerate(micro):
                sync = ddp.no_sync() if ddp is not None and j < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast(cfg.bf16, device):
                        loss = completion_loss_sum(ddp or model, m) * (weight / n_supervised)
                    loss.backward()
                loss_value += loss.item() / world
                step_tokens += m["n_tokens"] if weight else 0
            if world > 1:
                totals = torch.tensor([loss_value, step_tokens], dtype=torch.float64)
                torch.distributed.all_reduce(totals)
                loss_value, step_tokens = totals[0].item(), int(totals[1].item())
            tokens += step_tokens
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            entry = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": loss_value,
                     "lr": scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s": tokens / elapsed}
            if val_set and (step % eval_every == 0 or step == total_steps):
                entry["val_loss"] = validation_loss(model, val_set, pad_id, cfg.batch_size, cfg.bf16)
                if score_fn is not None:
                    entry["val_metric"] = float(score_fn(model))
                score = entry["val_metric"] if score_fn is not None else -entry["val_loss"]
                if best["score"] is None or score > best["score"]:
                    best = {"score": score, "step": step, "bad": 0}
                    if cfg.keep_best:
                        best_weights = {n: p.detach().clone() for n, p in named}
                else:
                    best["bad"] += 1
                    if cfg.early_stopping_patience and best["bad"] >= cfg.early_stopping_patience:
                        entry["early_stop"] = stopped = True
            record(entry)
            if checkpoint_dir is not None and cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(checkpoint_dir, named, optimizer, scheduler,
                                {"step": step, "tokens": tokens, "elapsed": elapsed, "best": best}, best_weights)
            bar.update(1)
            bar.set_postfix({k: f"{entry[k]:.4g}" for k in ("loss", "val_loss", "val_metric", "tokens_per_s") if k in entry})
            if stopped:
                break
    bar.close()
    if cfg.keep_best and best_weights is not None and best["step"] != step:
        with torch.no_grad():
            for n, p in named:
                p.copy_(best_weights[n])
    if log_file:
        log_file.close()
    if board:
        board.close()
    return log


def check_launcher() -> None:
    """Refuse an `accelerate launch` configured for FSDP or DeepSpeed: the loop replicates the model (DDP) and would
    otherwise ignore the sharding the user asked for."""
    import os

    for key, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(key, "").lower() in ("true", "1"):
            raise InstructuneError(f"{name} is not supported: instructune trains with DDP (one whole model per process); "
                                   "launch with `accelerate launch --multi_gpu` or `torchrun` instead", f"{key}={os.environ[key]}")


def distributed() -> tuple[int, int]:
    """(process index, process count). Under `accelerate launch --multi_gpu` or `torchrun` (which set WORLD_SIZE,
    RANK and the rendezvous address) the process group is created here: NCCL on GPUs, gloo on CPUs. A plain run is
    process 0 of 1."""
    import os

    check_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def save_checkpoint(folder: Path, named, optimizer, scheduler, state: dict, best_weights: dict | None = None) -> None:
    """Trainable weights (safetensors), optimizer and scheduler state, RNG state; the folder replaced atomically."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_file({n: p.detach().contiguous() for n, p in named}, str(tmp / "trainable.safetensors"))
    if best_weights is not None:
        save_file({n: w.contiguous() for n, w in best_weights.items()}, str(tmp / "best.safetensors"))
    torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)  # a kill at any point leaves either the old or the new checkpoint whole
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, named, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])
    state = torch.load(Path(folder) / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state
