"""The training loop: batches → step → log → validate → checkpoint (optimizer and schedule: `optim.py`; how the
processes share the work: `strategy.py`)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..attention import attention_window, takes_4d_mask
from ..config import TrainConfig
from ..errors import TrainingDiverged
from ..io import atomic_write, read_jsonl
from ..prompts.format import Encoded
from ..runtime import autocast, distributed, grouped_kv_heads
from .batching import length_grouped_batches, split_by_tokens
from . import memory
from .checkpoint import check_meta, newest_checkpoint
from .collate import collate
from .fused import lean_blocks, tied_gradient
from .loss import completion_loss_sum, to_device, validation_loss
from .optim import clip_gradients, make_optimizer
from .strategy import Strategy, prefix_pass, strategy_for


def train(model, train_set: list[Encoded], val_set: list[Encoded], cfg: TrainConfig, pad_id: int, seed: int, *,
          log_path: Path | None = None, checkpoint_dir: Path | None = None, resume: bool = False,
          tensorboard_dir: Path | None = None, score_fn=None, checkpoint_meta: dict | None = None,
          measured: dict | None = None, strategy: Strategy | None = None, on_step=None) -> list[dict]:
    """Supervised fine-tuning on completion tokens; returns the log (one dict per optimizer step).

    Each optimizer step takes `batch_size * grad_accum` length-grouped examples in `grad_accum` micro-batches, a
    long micro-batch further split into passes of at most `pass_tokens` padded tokens; the loss is normalised by the
    step's supervised tokens, so accumulation and splitting give the update of one big batch. With `checkpoint_dir`,
    a checkpoint (trainable weights, optimizer, scheduler, RNG, data position, and `checkpoint_meta`) is written
    atomically every `save_every` steps; `resume` continues from it exactly after checking it belongs to this
    training. A non-finite loss or gradient norm stops training (`TrainingDiverged`) before the weights change.

    At each validation, `score_fn(model) -> float` (higher is better: the task metric by generation) is logged as
    `val_metric`; it (or else the validation loss) decides the best step, early stopping and, with `keep_best`, the
    weights kept. Several processes: DDP or FSDP (`strategy`, by default `strategy_for` the config and process
    count). `measured` gets `memory.measured`'s figures; `on_step(entry)` sees each log entry (MLflow tracking)."""
    device = next(model.parameters()).device
    with grouped_kv_heads(device), lean_blocks(model, not cfg.gradient_checkpointing), tied_gradient(model):  # `fused`
        torch.manual_seed(seed)
        rank, world = distributed()
        strategy = strategy or strategy_for(cfg, world, model, score_fn)
        forward = strategy.wrap(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # FSDP: this process's shards
        plan = Plan(train_set, cfg, pad_id, seed, world, attention_window(model), takes_4d_mask(model),
                    prefix_pass(strategy.plan_name, world, cfg.gradient_checkpointing))
        optimizer, scheduler = make_optimizer([p for _, p in named], cfg, plan.total_steps, device)
        best, progress = Best(cfg), Progress()
        meta = {**(checkpoint_meta or {}), "total_steps": plan.total_steps, "processes": world,
                "trainable": {n: list(p.shape) for n, p in named}, **strategy.meta}
        if resume and (found := newest_checkpoint(checkpoint_dir)):
            check_meta(found, meta)
            state, best.weights = strategy.load_checkpoint(found, model, named, optimizer, scheduler)
            progress.restore(state)
            best.state = state.get("best", best.state)
        log = TrainLog(log_path, tensorboard_dir, progress.step, resume, on_step, writes=rank == 0, device=device)
        model.train()
        bar = progress.start(plan.total_steps, show=rank == 0)
        for group in plan.groups(progress.step):
            loss, tokens = train_step(forward, strategy, plan.passes(group, rank, device), world, cfg, device)
            diverged(progress.step + 1, "loss", loss)
            optimizer_step(named, optimizer, scheduler, cfg.max_grad_norm, progress.step + 1)
            entry = progress.advance(loss, tokens, scheduler.get_last_lr()[0], plan.steps_per_epoch)
            if val_set and plan.validates(entry["step"]):
                validate(model, val_set, pad_id, cfg, score_fn, entry, best, named)
            log.record(entry)
            if strategy.writes(rank) and checkpoint_dir is not None and plan.checkpoints(entry["step"]):
                strategy.save_checkpoint(checkpoint_dir, model, named, optimizer, scheduler,
                                         {**progress.state(), "best": best.state}, best.weights, meta)
            bar.update(1)
            bar.set_postfix({k: f"{entry[k]:.4g}" for k in ("loss", "val_loss", "val_metric", "tokens_per_s") if k in entry})
            if entry.get("early_stop"):
                break
        bar.close()
        log.close()
        best.restore(named, progress.step)
        if measured is not None:
            measured.update(memory.measured(model, optimizer, device, world))
        return log.entries


@dataclass
class Progress:
    """Where training stands (what a checkpoint saves and resume restores) and the clock for tokens/s."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    started: float = 0.0

    def restore(self, state: dict) -> None:
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]

    def start(self, total: int, show: bool) -> tqdm:
        """Start the clock; returns the progress bar over `total` steps, from this one (shown where `show`)."""
        self.started = time.perf_counter() - self.elapsed
        return tqdm(total=total, initial=self.step, desc="fine-tuning", unit="step", dynamic_ncols=True,
                    disable=not show)

    def advance(self, loss: float, tokens: int, lr: float, steps_per_epoch: int) -> dict:
        """Count one optimizer step; its log entry."""
        self.step += 1
        self.tokens += tokens
        self.elapsed = time.perf_counter() - self.started
        return {"step": self.step, "epoch": round(self.step / steps_per_epoch, 3), "loss": loss, "lr": lr,
                "tokens": self.tokens, "tokens_per_s": self.tokens / self.elapsed}

    def state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed}


@dataclass
class Plan:
    """The data side of training: which examples make each optimizer step (a function of the step alone, so a
    resumed run sees the same batches), and the collated passes of one process."""

    examples: list[Encoded]
    cfg: TrainConfig
    pad_id: int
    seed: int
    world: int
    window: int | None
    fused: bool
    two_pass: bool = True  # the shared prefix as a pass of its own (`strategy.prefix_pass`; see `collate`)

    def __post_init__(self):
        self.lengths = [len(e.input_ids) for e in self.examples]
        self.supervised = [e.n_supervised for e in self.examples]
        self.per_step = self.cfg.batch_size * self.cfg.grad_accum * self.world  # the global batch
        self.steps_per_epoch = math.ceil(len(self.examples) / self.per_step)
        self.total_steps = max(1, math.ceil(self.steps_per_epoch * self.cfg.epoch_count))
        self.eval_every = self.cfg.eval_every or self.steps_per_epoch

    def validates(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps

    def checkpoints(self, step: int) -> bool:
        """A checkpoint every `save_every` steps, but not at the end (the saved model replaces it)."""
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0 and step < self.total_steps

    def groups(self, step: int) -> Iterator[list[int]]:
        """The global batches from `step` on, one per optimizer step."""
        while step < self.total_steps:
            epoch, position = divmod(step, self.steps_per_epoch)
            for group in length_grouped_batches(self.lengths, self.per_step, self.seed + epoch)[position:]:
                if step >= self.total_steps:
                    return
                yield group
                step += 1

    def passes(self, group: list[int], rank: int, device) -> tuple[list[dict], float, int]:
        """This process's share of a global batch as collated passes, the weight of its loss and the supervised
        tokens of the whole step (all micro-batches of all processes: accumulation = one big batch)."""
        n_supervised = sum(self.supervised[i] for i in group)
        weight = float(self.world)  # DDP averages gradients over processes: undo it
        # The step's micro-batches are the same whatever the process count: world x grad_accum slices of the group,
        # in order (at most batch_size each), process r taking slices r, r + world, ... So one process accumulating
        # two micro-batches computes exactly the passes two processes share, and their gradients differ only in
        # the summation of the halves (no rounding at all with 2: a + b). Each split further into passes of at most
        # pass_tokens (long examples).
        slots = self.world * self.cfg.grad_accum
        size = math.ceil(len(group) / slots)
        mine = [group[j:j + size] for j in range(rank * size, len(group), self.world * size)]
        if not mine:  # a short last step: this process still joins the gradient all-reduce, with zero weight
            mine, weight = [group[:1]], 0.0
        parts = [part for micro in mine for part in split_by_tokens(micro, self.lengths, self.cfg.pass_tokens)]
        micro = [to_device(collate([self.examples[i] for i in part], self.pad_id, self.cfg.packing,
                                   self.cfg.share_prefix, self.window, self.fused, self.two_pass), device)
                 for part in parts]
        return micro, weight, n_supervised


def train_step(forward, strategy: Strategy, passes: tuple[list[dict], float, int], world: int, cfg: TrainConfig,
               device) -> tuple[float, int]:
    """Forward (on `forward`, the module the strategy wrapped) and backward over one step's passes (gradients
    summed, exchanged between processes at the last); returns the step's loss and tokens."""
    micro, weight, n_supervised = passes
    loss_value, step_tokens = 0.0, 0
    for j, m in enumerate(micro):
        sync = strategy.no_sync() if j < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with autocast(cfg.bf16, device):
                loss = completion_loss_sum(forward, m) * (weight / n_supervised)
            loss.backward()
        loss_value += loss.item() / world
        step_tokens += m["n_tokens"] if weight else 0
    if world > 1:
        totals = torch.tensor([loss_value, step_tokens], dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        loss_value, step_tokens = totals[0].item(), int(totals[1].item())
    return loss_value, step_tokens


def optimizer_step(named, optimizer, scheduler, max_grad_norm: float | None, step: int) -> None:
    if max_grad_norm:
        diverged(step, "gradient norm", clip_gradients([p for _, p in named], max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def diverged(step: int, what: str, value: float) -> None:
    """Stop on a loss or gradient norm that is no longer a finite number: nothing after it would be a result."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"training diverged at step {step}: the {what} is {value}. Nothing was saved as a model; "
                               "the last checkpoint (if any) is kept. Lower train.lr (or set train.max_grad_norm) and "
                               "train again", "train")


def validate(model, val_set: list[Encoded], pad_id: int, cfg: TrainConfig, score_fn, entry: dict, best: "Best",
             named) -> None:
    """Validation loss (and `score_fn`'s metric) into `entry`; tracks the best step and early stopping."""
    entry["val_loss"] = validation_loss(model, val_set, pad_id, cfg.batch_size, cfg.bf16)
    diverged(entry["step"], "validation loss", entry["val_loss"])
    if score_fn is not None:
        entry["val_metric"] = float(score_fn(model))
    score = entry["val_metric"] if score_fn is not None else -entry["val_loss"]
    if best.update(score, entry["step"], named):
        entry["early_stop"] = True


@dataclass
class Best:
    """The best validation so far (its score, step and how many validations have not beaten it since), and, with
    `keep_best`, a copy of its trainable weights."""

    cfg: TrainConfig
    state: dict = field(default_factory=lambda: {"score": None, "step": 0, "bad": 0})
    weights: dict | None = None

    def update(self, score: float, step: int, named) -> bool:
        """Record a validation score (higher is better); True when early stopping's patience has run out."""
        if self.state["score"] is None or score > self.state["score"]:
            self.state = {"score": score, "step": step, "bad": 0}
            if self.cfg.keep_best:
                self.weights = {n: p.detach().clone() for n, p in named}
            return False
        self.state["bad"] += 1
        patience = self.cfg.early_stopping_patience
        return bool(patience) and self.state["bad"] >= patience

    def restore(self, named, step: int) -> None:
        """With `keep_best`, end with the best step's weights (unless it is the last step)."""
        if self.cfg.keep_best and self.weights is not None and self.state["step"] != step:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(self.weights[n])


class TrainLog:
    """The per-step log: kept in memory, appended to a JSON-lines file and, optionally, to TensorBoard and `on_step`.

    On resume the file is cut back to the checkpoint's step; a fresh run starts a new file."""

    def __init__(self, path: Path | None, tensorboard_dir: Path | None, step: int, resume: bool, on_step=None,
                 writes: bool = True, device=None):
        if not writes:  # only process 0 logs
            path = tensorboard_dir = on_step = None
        self.device = device  # given: each entry also gets `peak_gb`, the process's peak memory so far
        self.entries: list[dict] = []
        self.on_step = on_step
        if path and resume and step:
            self.entries = [e for e in read_jsonl(path) if e["step"] <= step]
            atomic_write(path, "".join(json.dumps(e) + "\n" for e in self.entries))
        elif path:
            path.unlink(missing_ok=True)
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.board = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            self.board = SummaryWriter(str(tensorboard_dir), purge_step=step + 1 if resume else None)

    def record(self, entry: dict) -> None:
        if self.device is not None:
            entry["peak_gb"] = round(memory.peak_memory(self.device) / memory.GB, 3)  # in the plan's unit
        self.entries.append(entry)
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.board:
            for key in ("loss", "val_loss", "lr", "tokens_per_s"):
                if key in entry:
                    self.board.add_scalar(f"train/{key}", entry[key], entry["step"])
        if self.on_step:
            self.on_step(entry)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board:
            self.board.close()
