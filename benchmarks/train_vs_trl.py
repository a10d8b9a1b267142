"""Training throughput, peak memory and loss: instructune's training loop against Hugging Face TRL's `SFTTrainer`.

Not a test: run it by hand. TRL is a benchmark-only dependency, not one of instructune's:

    .venv/bin/pip install trl
    .venv/bin/python benchmarks/train_vs_trl.py --steps 10 --models smollm2-135m

Both tools train the same model (a preset resolved by instructune, loaded in fp32 from its local safetensors folder)
with the same LoRA adapter (r=16, alpha=32, dropout `--lora-dropout` (default 0), all linear layers), AdamW (no weight decay, gradient
clipping at 1.0), learning rate 5e-4 on a linear schedule with the same warm-up (`--warmup-steps`, default 0: with
warm-up, transformers' schedule starts at lr 0 and instructune's at lr/(warmup+1), the one place they differ),
batch size 8, `--steps N` optimizer steps over exactly the first N*8 training examples (one epoch), fp32 unless
`--bf16` (autocast for both). The examples are instructune's own: prepared by `instructune.experiment.prepare` and
encoded by the task's `PromptFormat` (prompt tokens masked, completion and end token trained); TRL gets the very
same token ids as a pre-tokenized dataset (`input_ids` + `completion_mask`, `completion_only_loss=True`), so both
compute the loss over the same tokens. The order inside the epoch differs: TRL's sampler shuffles, instructune
groups examples of similar length into each step (fewer padding tokens), so per-step losses are not the same
batches; the mean loss over the last 5 steps is printed alongside the last step's.

TRL's `SFTConfig` turns gradient checkpointing on by default; instructune does not use it, so this benchmark turns
it off for TRL too (like for like) unless `--trl-gradient-checkpointing` is given.

Each (tool, model) runs in its own subprocess (`--worker TOOL MODEL`), so peak RSS (`ru_maxrss`) is per tool; both
workers do the same preparation (config, tokenizer, data, model load) before training. Throughput counts
non-padding tokens (the attention mask) processed by the optimizer steps, over training wall time; "steady" leaves
out the first step (warm-up of kernels and allocators), "whole" counts every step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8
MAX_LENGTH = 512
LR = 5e-4


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def prepared(config: str, model: str, steps: int):
    from instructune.config import load_config
    from instructune.experiment import prepare

    cfg = load_config(str(ROOT / config) if not Path(config).is_absolute() else config, [f"model.name={model}"])
    prep = prepare(cfg)
    task = prep.tasks[0]
    pairs = task.pairs["train"][: steps * BATCH]
    if len(pairs) < steps * BATCH:
        raise SystemExit(f"only {len(pairs)} training examples, {steps * BATCH} needed for {steps} steps")
    encoded = [task.fmt.encode(p, MAX_LENGTH) for p in pairs]
    return cfg, prep, encoded


def run_instructune(args, cfg, prep, encoded) -> dict:
    import torch

    from instructune.models import load_model, wrap_lora
    from instructune.train.loop import train

    torch.manual_seed(0)
    lora = cfg.train.lora.model_copy(update={"r": 16, "alpha": 32, "dropout": args.lora_dropout, "target_modules": "all-linear"})
    tcfg = cfg.train.model_copy(update={
        "method": "lora", "lr": LR, "batch_size": BATCH, "grad_accum": 1, "epochs": 1.0, "bf16": args.bf16,
        "max_length": MAX_LENGTH, "weight_decay": 0.0, "max_grad_norm": 1.0, "lora": lora,
        # int(steps * ratio) == warmup_steps; the epsilon guards against float rounding down
        "warmup_ratio": (args.warmup_steps / args.steps + 1e-9) if args.warmup_steps else 0.0,
    })
    model = wrap_lora(load_model(prep.model_source, cfg.model), tcfg.lora)
    log = train(model, encoded, [], tcfg, prep.tokenizer.pad_token_id, seed=0)
    elapsed = [e["tokens"] / e["tokens_per_s"] for e in log]
    return {"losses": [e["loss"] for e in log], "tokens": [e["tokens"] for e in log], "elapsed": elapsed}


def run_trl(args, cfg, prep, encoded) -> dict:
    import datasets
    import peft
    import torch
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback

    torch.manual_seed(0)
    rows = {"input_ids": [e.input_ids for e in encoded],
            "completion_mask": [[int(label != -100) for label in e.labels] for e in encoded]}
    dataset = datasets.Dataset.from_dict(rows)
    model = AutoModelForCausalLM.from_pretrained(prep.model_source, dtype=torch.float32, use_safetensors=True)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "instructune-train-vs-trl"
    sft = trl.SFTConfig(
        output_dir=str(out), completion_only_loss=True, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=args.steps, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=1, report_to=[], save_strategy="no", bf16=args.bf16, fp16=False, use_cpu=True,
        dataloader_num_workers=0, seed=0, max_length=MAX_LENGTH, packing=False,
        gradient_checkpointing=args.trl_gradient_checkpointing, disable_tqdm=True)

    marks: list[float] = []
    counted: list[int] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    class Counting(trl.SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            counted.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *rest, **kw)

    trainer = Counting(model=model, args=sft, train_dataset=dataset, processing_class=prep.tokenizer,
                       peft_config=lora, callbacks=[Timer()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    tokens, total = [], 0
    for c in counted:
        total += c
        tokens.append(total)
    return {"losses": losses, "tokens": tokens, "elapsed": [m - marks[0] for m in marks[1:]],
            "trl": trl.__version__, "gradient_checkpointing": args.trl_gradient_checkpointing}


def worker(args) -> None:
    tool, model = args.worker
    cfg, prep, encoded = prepared(args.config, model, args.steps)
    result = (run_instructune if tool == "instructune" else run_trl)(args, cfg, prep, encoded)
    result.update(tool=tool, model=model, peak_rss_mib=peak_rss_mib())
    print("RESULT " + json.dumps(result), flush=True)


def throughput(r: dict, steady: bool) -> float:
    if steady and len(r["tokens"]) > 1:
        return (r["tokens"][-1] - r["tokens"][0]) / (r["elapsed"][-1] - r["elapsed"][0])
    return r["tokens"][-1] / r["elapsed"][-1]


def spawn(tool: str, model: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, model, "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--config", args.config, "--lora-dropout", str(args.lora_dropout)]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{tool} worker for {model} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  {tool:<11} {model}: {time.perf_counter() - started:.0f} s in all", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (batch size 8: steps*8 examples)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="LoRA dropout for both tools (default 0, instructune's default; 0.05 is TRL's usual)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both (default fp32)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient checkpointing (off by default here: instructune has none)")
    parser.add_argument("--config", default="configs/uci-sentiment.yaml")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker[0] not in ("instructune", "trl"):
            parser.error("--worker TOOL must be instructune or trl")
        return worker(args)

    import torch

    print(f"# {args.steps} steps x batch {BATCH}, LoRA dropout {args.lora_dropout}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; TRL gradient checkpointing "
          f"{'on' if args.trl_gradient_checkpointing else 'off'}; same examples, order within the epoch differs "
          f"(TRL shuffles, instructune groups by length)", flush=True)
    for model in args.models:
        ours = spawn("instructune", model, args)
        theirs = spawn("trl", model, args)
        common = min(len(ours["losses"]), len(theirs["losses"]))
        last_o, last_t = ours["losses"][common - 1], theirs["losses"][common - 1]
        tail = min(5, common)
        mean_o = sum(ours["losses"][common - tail:common]) / tail
        mean_t = sum(theirs["losses"][common - tail:common]) / tail
        steady_o, steady_t = throughput(ours, True), throughput(theirs, True)
        whole_o, whole_t = throughput(ours, False), throughput(theirs, False)
        print(f"{model} (TRL {theirs['trl']}): tokens/s {steady_o:.0f} vs {steady_t:.0f} ({steady_o / steady_t:.2f}x; "
              f"whole run {whole_o:.0f} vs {whole_t:.0f}, {whole_o / whole_t:.2f}x), "
              f"peak RSS {ours['peak_rss_mib']:.0f} vs {theirs['peak_rss_mib']:.0f} MiB "
              f"({ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x), "
              f"loss at step {common} {last_o:.4f} vs {last_t:.4f} ({(last_o / last_t - 1) * 100:+.1f} %), "
              f"mean of last {tail} {mean_o:.4f} vs {mean_t:.4f} ({(mean_o / mean_t - 1) * 100:+.1f} %) "
              f"[instructune vs TRL; tokens {ours['tokens'][-1]} vs {theirs['tokens'][-1]}]", flush=True)


if __name__ == "__main__":
    main()
