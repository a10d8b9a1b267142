"""Training throughput, peak memory and loss: instructune's training loop against Hugging Face TRL's `SFTTrainer`.

Not a test: run it by hand. TRL is a benchmark-only dependency, not one of instructune's:

    .venv/bin/pip install trl
    .venv/bin/python benchmarks/train_vs_trl.py                        # both presets, both data sets, both tables
    .venv/bin/python benchmarks/train_vs_trl.py --models smollm2-135m --data uci --tables same
    .venv/bin/python benchmarks/train_vs_trl.py --method qlora --tables same    # QLoRA against TRL + bitsandbytes

Table 1, the same settings: both tools train the same model (a preset resolved by instructune, loaded in fp32 from
its local safetensors folder) with the same LoRA adapter (r=16, alpha=32, dropout `--lora-dropout` (default 0), all
linear layers), AdamW (no weight decay, gradient clipping at 1.0), learning rate 5e-4 on a linear schedule with the
same warm-up (`--warmup-steps`, default 0: with warm-up, transformers' schedule starts at lr 0 and instructune's at
lr/(warmup+1), the one place they differ), batch size 8, fp32 unless `--bf16`, on the same examples in the same
order: instructune's own, prepared by `instructune.tasks.prepare` and encoded by the task's `PromptFormat`
(prompt tokens masked, completion and end token trained). TRL gets the very same token ids as a pre-tokenized
dataset (`input_ids` + `completion_mask`, `completion_only_loss=True`) already in instructune's step order
(length-grouped) and reads it sequentially (`train_sampling_strategy="sequential"`), so step N of each tool sees
the same 8 examples and the losses are comparable step for step. TRL's `SFTConfig` turns gradient checkpointing on
by default; it is off here, as instructune's `train.gradient_checkpointing` is by default, unless
`--trl-gradient-checkpointing`.

`--method qlora`: the same, on a base whose linear layers load in 4 bits (bitsandbytes NF4, double quantization):
instructune's `train.method: qlora`, and TRL's QLoRA recipe (`BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`, the compute dtype fp32, or bf16 under bf16, and peft
LoRA on top through `peft_config`; TRL keeps that adapter in bf16, instructune in fp32). The other weights
(embeddings, norms) stay as loaded, fp32 unless bf16, in both.

Table 2, each tool at its fastest settings found on this machine: TRL with bf16 autocast, without gradient
checkpointing and with its own length grouping (`train_sampling_strategy="group_by_length"`; its padding-free mode
needs FlashAttention, so not on a CPU); instructune with its defaults (fp32, length-grouped batches, shared prefix;
bf16 is slower here, see `bf16()`). Orders differ there, so the loss column is the mean over the last 5 steps.

Data: `uci` is the UCI sentiment classification data (configs/uci-sentiment.yaml; completions of 2 tokens), `emails`
the e-mail subject lines (configs/email-subjects.yaml, a short summarization with ~8-token completions and prompts
of ~200 tokens), both from ../shared/datasets/. `--steps N` optimizer steps take the first N*8 training examples
(`--email-steps` for the longer e-mails).

Each (tool, model, data, setting) runs in its own subprocess, so peak RSS (`ru_maxrss`) is per tool; both workers do
the same preparation (config, tokenizer, data, model load) before training. Throughput counts non-padding tokens
processed by the optimizer steps, over training wall time; "steady" leaves out the first step (warm-up of kernels
and allocators), "whole" counts every step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8
MAX_LENGTH = 384
LR = 5e-4
DATA = {"uci": "configs/uci-sentiment.yaml", "emails": "configs/email-subjects.yaml"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def prepared(config: str, model: str, steps: int):
    from instructune.config import load_config
    from instructune.tasks import prepare

    cfg = load_config(str(ROOT / config) if not Path(config).is_absolute() else config, [f"model.name={model}"])
    prep = prepare(cfg)
    task = prep.tasks[0]
    pairs = task.pairs["train"][: steps * BATCH]
    if len(pairs) < steps * BATCH:
        raise SystemExit(f"only {len(pairs)} training examples, {steps * BATCH} needed for {steps} steps")
    encoded = [task.fmt.encode(p, MAX_LENGTH, task.template.max_new_tokens) for p in pairs]
    return cfg, prep, encoded


def step_order(encoded) -> list[int]:
    """instructune's order of the examples in its first epoch (seed 0): its optimizer steps, one after the other."""
    from instructune.train.batching import length_grouped_batches

    return [i for group in length_grouped_batches([len(e.input_ids) for e in encoded], BATCH, 0) for i in group]


def run_instructune(args, cfg, prep, encoded) -> dict:
    import torch

    from instructune.models import training_model
    from instructune.train.loop import train

    torch.manual_seed(0)
    lora = cfg.train.lora.model_copy(update={"r": 16, "alpha": 32, "dropout": args.lora_dropout, "target_modules": "all-linear"})
    tcfg = cfg.train.model_copy(update={
        "method": args.method, "lr": LR, "batch_size": BATCH, "grad_accum": 1, "epochs": 1.0, "bf16": bf16(args),
        "max_length": MAX_LENGTH, "weight_decay": 0.0, "max_grad_norm": 1.0, "lora": lora,
        # int(steps * ratio) == warmup_steps; the epsilon guards against float rounding down
        "warmup_ratio": (args.warmup_steps / args.steps + 1e-9) if args.warmup_steps else 0.0,
    })
    model = training_model(prep.model_source, cfg.model, tcfg)
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
    best = args.setting == "best"
    if not best:  # the same steps as instructune: its order, read sequentially
        encoded = [encoded[i] for i in step_order(encoded)]
    rows = {"input_ids": [e.input_ids for e in encoded],
            "completion_mask": [[int(label != -100) for label in e.labels] for e in encoded]}
    dataset = datasets.Dataset.from_dict(rows)
    quantized = {}
    if args.method == "qlora":  # TRL's QLoRA recipe; compute in the autocast dtype, as instructune does
        from transformers import BitsAndBytesConfig

        quantized = {"device_map": {"": "cpu"}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16(args) else torch.float32)}
    model = AutoModelForCausalLM.from_pretrained(prep.model_source, dtype=torch.float32, use_safetensors=True,
                                                 **quantized)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "instructune-train-vs-trl"
    sft = trl.SFTConfig(
        output_dir=str(out), completion_only_loss=True, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=steps_for(args), num_train_epochs=1, learning_rate=LR, lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=1, report_to=[], save_strategy="no", bf16=bf16(args), fp16=False, use_cpu=True,
        dataloader_num_workers=0, seed=0, max_length=MAX_LENGTH, packing=False,
        train_sampling_strategy="group_by_length" if best else "sequential",
        gradient_checkpointing=args.trl_gradient_checkpointing and not best, disable_tqdm=True)

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


def bf16(args) -> bool:
    """Table 1: as asked (fp32 unless --bf16). Table 2: each tool's fastest here. For TRL that is bf16 autocast; for
    instructune fp32, its default: with its few tokens per step left after logits-only-where-needed and the shared
    prefix, bf16 matmuls on this CPU cost more in weight conversions than they save (bf16 still halves the memory
    of LoRA's frozen weights; see the README)."""
    if args.setting == "best":
        return args.worker[0] == "trl"
    return args.bf16


def worker(args) -> None:
    tool, model = args.worker
    cfg, prep, encoded = prepared(DATA.get(args.data, args.data), model, steps_for(args))
    result = (run_instructune if tool == "instructune" else run_trl)(args, cfg, prep, encoded)
    result.update(tool=tool, model=model, peak_rss_mib=peak_rss_mib())
    print("RESULT " + json.dumps(result), flush=True)


def throughput(r: dict, steady: bool) -> float:
    if steady and len(r["tokens"]) > 1:
        return (r["tokens"][-1] - r["tokens"][0]) / (r["elapsed"][-1] - r["elapsed"][0])
    return r["tokens"][-1] / r["elapsed"][-1]


def steps_for(args) -> int:
    return args.email_steps if args.data == "emails" else args.steps


def spawn(tool: str, model: str, data: str, setting: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, model, "--data", data, "--setting", setting,
           "--steps", str(args.steps), "--email-steps", str(args.email_steps), "--warmup-steps", str(args.warmup_steps),
           "--lora-dropout", str(args.lora_dropout), "--method", args.method]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}  # TRL pings the Hub when a trainer starts
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{tool} worker for {model} on {data} ({setting}) failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  {tool:<11} {model} {data} {setting}: {time.perf_counter() - started:.0f} s in all", file=sys.stderr, flush=True)
    return result


def median_run(runs: list[dict]) -> dict:
    """One tool's (repeated) runs as one: the median tokens/s, steady and whole, and peak RSS (the losses are the
    same in every run)."""
    return dict(runs[0], peak_rss_mib=statistics.median(r["peak_rss_mib"] for r in runs),
                steady=statistics.median(throughput(r, True) for r in runs),
                whole=statistics.median(throughput(r, False) for r in runs))


def compare(model: str, data: str, setting: str, ours: dict, theirs: dict) -> str:
    common = min(len(ours["losses"]), len(theirs["losses"]))
    last_o, last_t = ours["losses"][common - 1], theirs["losses"][common - 1]
    tail = min(5, common)
    mean_o = sum(ours["losses"][common - tail:common]) / tail
    mean_t = sum(theirs["losses"][common - tail:common]) / tail
    steady_o, steady_t, whole_o, whole_t = ours["steady"], theirs["steady"], ours["whole"], theirs["whole"]
    rss_o, rss_t = ours["peak_rss_mib"], theirs["peak_rss_mib"]
    loss = (f"loss at step {common} {last_o:.4f} vs {last_t:.4f} ({(last_o / last_t - 1) * 100:+.1f} %)" if setting == "same"
            else f"mean loss of the last {tail} steps {mean_o:.4f} vs {mean_t:.4f} (different orders)")
    return (f"{model:<13} {data:<6} tokens/s {steady_o:4.0f} vs {steady_t:4.0f} ({steady_o / steady_t:.2f}x; whole run "
            f"{whole_o / whole_t:.2f}x)  peak RSS {rss_o:4.0f} vs {rss_t:4.0f} MiB ({rss_o / rss_t:.2f}x)  {loss}  "
            f"[tokens {ours['tokens'][-1]} vs {theirs['tokens'][-1]}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--data", nargs="+", default=["uci", "emails"],
                        help="uci (sentiment classification), emails (subject lines: summarization), or config paths")
    parser.add_argument("--tables", nargs="+", choices=["same", "best"], default=["same", "best"],
                        help="same: identical settings and steps; best: each tool at its best settings (bf16)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps on uci (batch size 8: steps*8 examples)")
    parser.add_argument("--email-steps", type=int, default=5, help="optimizer steps on emails (longer prompts)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each tool this many times, taking turns, and report the medians (a shared machine's "
                             "speed drifts by +-15 %% between runs; 3 gives steadier ratios, at 3x the time)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="LoRA dropout for both tools (default 0, instructune's default; 0.05 is TRL's usual)")
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora",
                        help="qlora: both tools on a 4-bit base (bitsandbytes NF4, double quantization)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both in table 1 (default fp32)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient checkpointing in table 1 (off by default, as instructune's)")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="same", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.worker:
        if args.worker[0] not in ("instructune", "trl"):
            parser.error("--worker TOOL must be instructune or trl")
        args.data = args.data[0]
        return worker(args)

    import torch

    started = time.perf_counter()
    base = "on a 4-bit NF4 base (QLoRA, bitsandbytes), " if args.method == "qlora" else ""
    print(f"# instructune vs TRL, batch 8, LoRA r=16 all-linear, {base}dropout {args.lora_dropout}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; steps: uci {args.steps}, emails {args.email_steps}"
          + (f"; medians of {args.repeats} runs per tool" if args.repeats > 1 else ""), flush=True)
    for setting in args.tables:
        if setting == "same":
            print(f"\n## 1. same settings: {'bf16 autocast' if args.bf16 else 'fp32'}, same examples in the same order, "
                  f"TRL gradient checkpointing {'on' if args.trl_gradient_checkpointing else 'off'} "
                  f"[instructune vs TRL]", flush=True)
        else:
            print("\n## 2. each tool at its fastest settings here: TRL bf16 autocast, group_by_length, no gradient "
                  "checkpointing; instructune defaults (fp32) [instructune vs TRL]", flush=True)
        for model in args.models:
            for data in args.data:
                ours, theirs = [], []
                for _ in range(args.repeats):  # taking turns, so a slow spell of the machine hits both
                    ours.append(spawn("instructune", model, data, setting, args))
                    theirs.append(spawn("trl", model, data, setting, args))
                print(compare(model, data, setting, median_run(ours), median_run(theirs)), flush=True)
    print(f"\n# {time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
