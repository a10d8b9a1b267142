"""`train.epochs: auto` and `train.lr: auto`: how long and how fast to train, from the training data and the method,
by the rules below (README, "Settings that scale with the data"); `instructune plan` prints what they come to.

- epochs: repeat a small training split until training has taken at least MIN_STEPS optimizer steps (few examples
  need more passes to be learnt), never more than MAX_EPOCHS passes (full fine-tuning overfits sooner than an
  adapter), and never less than one pass (every example seen once).
- lr: the method's base rate (LoRA/QLoRA 1e-3, full 5e-5), scaled by the square root of the supervised tokens per
  optimizer step over REF_SUPERVISED (Adam's square-root scaling rule, Malladi et al. 2022: the loss is averaged
  over the supervised tokens, so they, not the examples, set the gradient's noise), between MIN_LR_SCALE and 1:
  a step of few answer tokens (a label) is noisy and gets a smaller rate."""

from __future__ import annotations

import math
from pathlib import Path

from ..config import TrainConfig
from ..io import read_jsonl

MIN_STEPS = 50
MAX_EPOCHS = {"lora": 10.0, "qlora": 10.0, "full": 3.0}
BASE_LR = {"lora": 1e-3, "qlora": 1e-3, "full": 5e-5}
REF_SUPERVISED = 128
MIN_LR_SCALE = 0.25
# For the time estimate when no training was measured: SmolLM2-135M with LoRA on a 2-core CPU (README: the demo,
# fp32), scaled by the weights a token passes through (the embedding table costs a lookup, not a product).
REFERENCE_TOKENS_PER_S = 220.0
REFERENCE_WEIGHTS = 106e6


def steps_per_epoch(n_examples: int, cfg: TrainConfig, processes: int = 1) -> int:
    """Optimizer steps in one pass over `n_examples` (as `train.loop.Plan` counts them)."""
    return max(1, math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum * processes)))


def total_steps(n_examples: int, cfg: TrainConfig, epochs: float, processes: int = 1) -> int:
    return max(1, math.ceil(steps_per_epoch(n_examples, cfg, processes) * epochs))


def auto_epochs(n_examples: int, cfg: TrainConfig) -> tuple[float, str]:
    per_epoch = steps_per_epoch(n_examples, cfg)
    epochs = round(min(MAX_EPOCHS[cfg.method], max(1.0, MIN_STEPS / per_epoch)), 2)
    return epochs, (f"{n_examples:,} training examples make {per_epoch:,} steps per epoch; at least {MIN_STEPS} "
                    f"steps, 1 to {MAX_EPOCHS[cfg.method]:g} epochs for {cfg.method}")


def auto_lr(n_examples: int, supervised: int, cfg: TrainConfig) -> tuple[float, str]:
    per_step = supervised / steps_per_epoch(n_examples, cfg)
    scale = min(1.0, max(MIN_LR_SCALE, math.sqrt(per_step / REF_SUPERVISED)))
    lr = float(f"{BASE_LR[cfg.method] * scale:.2g}")
    return lr, (f"{cfg.method} base {BASE_LR[cfg.method]:g} x sqrt({per_step:.0f} supervised tokens per step / "
                f"{REF_SUPERVISED}), kept within {MIN_LR_SCALE:g}..1 of the base")


def counts(tasks, max_length: int) -> tuple[int, int, int]:
    """Training examples, supervised tokens and all tokens of the tasks' training splits (`tasks.Task`s)."""
    encoded = [e for t in tasks for e in t.encoded("train", max_length)]
    return len(encoded), sum(e.n_supervised for e in encoded), sum(len(e.input_ids) for e in encoded)


def resolve(cfg: TrainConfig, tasks) -> list[str]:
    """Decide what `auto` means for this data (`cfg.set_auto`); one sentence per auto setting, for the log."""
    if "auto" not in (cfg.epochs, cfg.lr):
        return []
    n, supervised, _ = counts(tasks, cfg.max_length)
    said = []
    if cfg.epochs == "auto":
        epochs, why = auto_epochs(n, cfg)
        cfg.set_auto(epochs=epochs)
        said.append(f"train.epochs: auto -> {epochs:g} ({why})")
    if cfg.lr == "auto":
        lr, why = auto_lr(n, supervised, cfg)
        cfg.set_auto(lr=lr)
        said.append(f"train.lr: auto -> {lr:g} ({why})")
    return said


def measured_tokens_per_s(run_dir: Path) -> float | None:
    """tokens/s of the last training in a run folder (its train_log.jsonl), if there is one."""
    log = run_dir / "train_log.jsonl"
    rates = [e["tokens_per_s"] for e in read_jsonl(log) if isinstance(e, dict) and "tokens_per_s" in e] \
        if log.is_file() else []
    return rates[-1] if rates else None


def auto_settings_line(prep) -> str:
    """For `instructune plan`: the epochs and learning rate training will use (what `auto` came to, or the config's),
    the optimizer steps they make, and the time they would take (`prep`: a `tasks.Prepared`)."""
    from ..models import hf_config
    from .memory import model_shape

    cfg = prep.cfg.train
    resolve(cfg, prep.tasks)
    n, _, tokens = counts(prep.tasks, cfg.max_length)
    steps = total_steps(n, cfg, cfg.epoch_count)
    shape = model_shape(hf_config(prep.model_source, prep.cfg.model), cfg.method, cfg.lora)
    measured = measured_tokens_per_s(prep.cfg.run_dir())
    rate = measured or REFERENCE_TOKENS_PER_S * REFERENCE_WEIGHTS / max(shape.parameters - shape.root, 1) * (
        2 / 3 if cfg.method == "full" else 1)  # full: the weights' gradients too, a third more work
    seconds = tokens * cfg.epoch_count / rate
    source = (f"the {measured:.0f} tokens/s the last training in {prep.cfg.run_dir()} measured" if measured else
              f"about {rate:.0f} tokens/s, scaled from SmolLM2-135M LoRA on a 2-core CPU: a rough figure")
    how = lambda key, value: f"{value:g} (auto)" if getattr(cfg, key) == "auto" else f"{value:g}"  # noqa: E731
    return (f"training: train.epochs {how('epochs', cfg.epoch_count)}, train.lr {how('lr', cfg.learning_rate)}: "
            f"{steps:,} optimizer steps over {n:,} examples ({tokens * cfg.epoch_count:,.0f} tokens), about "
            f"{_duration(seconds)} at {source}")


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    if seconds < 1:
        return "under a second"
    return f"{seconds:.0f} s" if seconds < 90 else (f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h")
