"""How the processes share training: one process (`Single`), replicas (`DDP`) or shards (`FSDP`), chosen once by
`strategy_for`. A strategy wraps the model, says which module the forward runs on, how accumulation skips the gradient
exchange, who writes checkpoints and in which layout, and how the whole model is had for saving."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig
from ..models import training_model
from . import checkpoint, fsdp


def prefix_pass(strategy: str, processes: int, checkpointing: bool) -> bool:
    """Whether a batch's shared prompt prefix may run as a pass of its own (`collate`): not when sharded (FSDP with
    several processes: the prefix's keys and values would reach the loss past FSDP's backward hooks), nor under
    activation checkpointing (checkpointed layers keep no KV cache in training). The training (`loop.Plan`) and the
    memory plan (`experiment.memory_plan`) both ask here."""
    return not checkpointing and not (strategy == "fsdp" and processes > 1)


def strategy_for(cfg: TrainConfig, world: int, model, score_fn) -> Strategy:
    """Shards under `train.strategy: fsdp` (or an `accelerate launch` FSDP config) with several processes, after
    refusing what the sharded path does not do; otherwise DDP with several processes; one process trains as it is."""
    if fsdp.wanted(cfg, world):
        fsdp.check_supported(model, cfg, score_fn)
        return FSDP(cfg.bf16, world)
    return DDP() if world > 1 else Single()


class Single:
    """One process: the model as it is, whole checkpoints (`checkpoint.py`) written by process 0."""

    plan_name = "ddp"  # its name for `memory.footprint` and `prefix_pass` (with one process: no gradient buckets)
    meta: dict = {}  # what a checkpoint's meta.json adds to say which layout it holds

    def training_model(self, source: str, model_cfg: ModelConfig, train_cfg: TrainConfig):
        """The model to train, on this process's device: loaded whole (`models.training_model`)."""
        return training_model(source, model_cfg, train_cfg)

    def wrap(self, model):
        """Prepare the model for training; returns the module to call forward on."""
        self.module = model
        return model

    def no_sync(self):
        """Around a micro-batch's backward that is not the step's last: gradients are only exchanged at the last."""
        return contextlib.nullcontext()

    def writes(self, rank: int) -> bool:
        """Whether this process writes the checkpoints."""
        return rank == 0

    def save_checkpoint(self, folder: Path, model, named, optimizer, scheduler, state: dict, best_weights, meta: dict):
        checkpoint.save_checkpoint(folder, named, optimizer, scheduler, state, best_weights, meta)

    def load_checkpoint(self, folder: Path, model, named, optimizer, scheduler) -> tuple[dict, dict | None]:
        return checkpoint.load_checkpoint(folder, named, optimizer, scheduler)

    def gather(self, model):
        """The trained model whole, for saving, on process 0."""
        return model


class DDP(Single):
    """Several processes, each with a whole replica: the DDP wrapper averages gradients in backward; process 0 writes
    the checkpoints (every process holds the same weights)."""

    def wrap(self, model):
        self.module = torch.nn.parallel.DistributedDataParallel(model)
        return self.module

    def no_sync(self):
        return self.module.no_sync()


class FSDP(Single):
    """Several processes, each with 1/world of every parameter (`fsdp.shard`, FSDP2), from the start (`training_model`):
    every process writes its shards of each checkpoint, and `fsdp.gathered` makes the model whole on process 0 for
    saving."""

    plan_name = "fsdp"
    meta = {"strategy": "fsdp"}

    def __init__(self, bf16: bool, world: int):
        self.bf16, self.world = bf16, world

    def training_model(self, source: str, model_cfg: ModelConfig, train_cfg: TrainConfig):
        """Built on the meta device, sharded, and each process's shards read from the weight files: no process ever
        holds the whole model (`fsdp.sharded_model`)."""
        return fsdp.sharded_model(source, model_cfg, train_cfg, self.world)

    def wrap(self, model):
        self.module = fsdp.shard(model, self.bf16, self.world)  # a model `training_model` made is sharded already
        return self.module

    def writes(self, rank: int) -> bool:
        return True

    def save_checkpoint(self, folder: Path, model, named, optimizer, scheduler, state: dict, best_weights, meta: dict):
        fsdp.save_sharded(folder, model, optimizer, scheduler, state, best_weights, meta)

    def load_checkpoint(self, folder: Path, model, named, optimizer, scheduler) -> tuple[dict, dict | None]:
        return fsdp.load_sharded(folder, model, optimizer, scheduler, named)

    def gather(self, model):
        """Every process takes part in the gather; process 0 gets a plain copy of the whole model, the others None."""
        return fsdp.gathered(model)


Strategy = Single | DDP | FSDP
