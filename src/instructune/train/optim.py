"""The optimizer and the learning-rate schedule named by `train.optimizer` and `train.scheduler`."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def adamw(params: list, cfg: TrainConfig, device) -> torch.optim.Optimizer:
    # the fused kernel updates all (LoRA: hundreds of small) tensors in one pass: ~4x faster steps than foreach on a CPU
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in params))


# After the warm-up, the share of the peak learning rate at `step` of `total` (`progress`: 0 at the warm-up's end,
# 1 at the last step). `linear` keeps its own arithmetic: its results must stay bit-identical to earlier runs.
def _linear(step: int, total: int, warmup: int) -> float:
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, total: int, warmup: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _constant(step: int, total: int, warmup: int) -> float:
    return 1.0


def clip_gradients(params: list, max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most `max_norm`; returns the norm before.

    The norm is the same to the last bit however the parameters are split between processes: each gradient's (under
    FSDP, each shard's) squares, in fp32, are summed in fp64 a chunk at a time, and the processes' sums added in fp64,
    so the fp32 norm does not depend on where a sum was cut. torch's `clip_grad_norm_` adds fp32 norms per tensor or,
    under FSDP, per shard: its last bits, and so every clipped gradient's, then differ from one process's, and Adam
    carries that into every later step (`benchmarks/memory_scaling.py`: FSDP x 2's losses 4e-6 off one process's after
    one step; with this, equal bit for bit where the passes are the same). The fp64 sum is also the more exact: torch's
    fp32 norm of 67M normal values here is 0.5 % off."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    mesh = next((g.device_mesh for g in grads if hasattr(g, "device_mesh")), None)  # FSDP: DTensor shards
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    total = torch.zeros((), dtype=torch.float64, device=local[0].device)
    for g in local:
        flat, chunk = g.reshape(-1), 1 << (24 if g.is_cuda else 20)  # the squares of 4 MB at a time on a CPU
        for i in range(0, flat.numel(), chunk):
            part = flat[i:i + chunk].float()  # (a bf16 gradient squared in fp32)
            total += torch.sum(part * part, dtype=torch.float64)
    if mesh is not None:
        torch.distributed.all_reduce(total, group=mesh.get_group())
    norm = total.sqrt().float().item()  # rounded to fp32 once: the same whatever the cuts
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0 and math.isfinite(norm):
        for g in local:
            g.mul_(coef)
    return norm


OPTIMIZERS = {"adamw": adamw}
SCHEDULES = {"linear": _linear, "cosine": _cosine, "constant": _constant}  # the names config.TrainConfig accepts


def lr_factor(name: str, step: int, total: int, warmup: int) -> float:
    """The schedule's multiplier of the learning rate at (0-based) `step`: a linear warm-up over the first `warmup`
    steps (from 1/(warmup+1) up to 1), then the named decay."""
    return (step + 1) / (warmup + 1) if step < warmup else SCHEDULES[name](step, total, warmup)


def make_optimizer(params: list, cfg: TrainConfig, total_steps: int, device):
    """The optimizer (`train.optimizer`) and its schedule (`train.scheduler`, warm-up from `train.warmup_ratio`)."""
    optimizer = OPTIMIZERS[cfg.optimizer](params, cfg, device)
    warmup = int(total_steps * cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.scheduler, s, total_steps, warmup))
    return optimizer, scheduler
