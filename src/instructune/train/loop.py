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
from ..prompts.format import Encoded
from .collate import collate, completion_loss_sum, length_grouped_batches


def autocast(bf16: bool, device: torch.device):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
          log_path: Path | None = None) -> list[dict]:
    """Supervised fine-tuning on completion tokens; returns the log (one dict per step or validation)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lengths = [len(e.input_ids) for e in train_set]
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(train_set) / per_step)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = int(total_steps * cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    eval_every = cfg.eval_every or steps_per_epoch
    log: list[dict] = []
    log_file = open(log_path, "a", encoding="utf-8") if log_path else None

    def record(entry: dict) -> None:
        log.append(entry)
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    model.train()
    step, epoch, tokens, started = 0, 0, 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc="fine-tuning", unit="step", dynamic_ncols=True)
    while step < total_steps:
        batches = length_grouped_batches(lengths, cfg.batch_size, seed + epoch)
        for group_start in range(0, len(batches), cfg.grad_accum):
            if step >= total_steps:
                break
            micro = [_to(collate([train_set[i] for i in b], pad_id), device) for b in batches[group_start:group_start + cfg.grad_accum]]
            n_supervised = sum(m["n_supervised"] for m in micro)  # normalise over the whole step: accumulation = one big batch
            loss_value = 0.0
            for m in micro:
                with autocast(cfg.bf16, device):
                    loss = completion_loss_sum(model, m) / n_supervised
                loss.backward()
                loss_value += loss.item()
                tokens += int(m["attention_mask"].sum())
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
            record(entry)
            bar.update(1)
            bar.set_postfix({k: f"{entry[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if k in entry})
        epoch += 1
    bar.close()
    if log_file:
        log_file.close()
    return log
