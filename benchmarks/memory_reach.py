"""Memory reach (issue 24): what QLoRA and activation checkpointing buy and cost on real presets and real data.

Not a test: run it by hand, with nothing else busy:

    .venv/bin/python benchmarks/memory_reach.py                          # both presets, both data sets, all five
    .venv/bin/python benchmarks/memory_reach.py --models smollm2-135m --data emails --email-steps 2 --methods lora-fp32 qlora

Each row is one training through the normal path, in its own subprocess (so every peak is that configuration's):
`tasks.prepare`, `experiment.start_run`, `experiment.run_train` (the memory plan, the model, `train.loop.train`, the
save) and, on the UCI data, `experiment.run_evaluate` (the test split, scored as `instructune run` scores it; a QLoRA
model is evaluated as trained: 4-bit base + adapter), in a temporary run folder. Same seed, steps and data for
every row of a (model, data, seed); `--seeds 0 1 2` runs every row once per experiment seed (the split, the adapter's
init and the data order) and prints each method's test accuracy over the seeds. The rows (`--methods`), each the config plus:

    lora-fp32    train.method: lora (the anchor)            lora-ckpt    lora + train.gradient_checkpointing: true
    lora-bf16    lora + train.bf16: true                    qlora-ckpt   qlora + train.gradient_checkpointing: true
    qlora        train.method: qlora (nf4, double quantization); train.bf16 per --qlora-bf16 (default auto: on where
                 bf16 is native, a GPU or a CPU with AVX512-BF16/AMX; off where torch emulates it, several times
                 slower), which keeps the frozen weights that are not quantized (embeddings, norms) in bf16

Data: `uci` is configs/uci-sentiment.yaml (one epoch of its training split by default: 1400 examples, 175 steps
of 8; `--uci-steps N` takes the first N*8), `emails` configs/email-subjects.yaml (long prompts, up to 384 tokens;
`--email-steps`, default 10). Per row, from the process itself (Linux VmHWM/VmRSS; a GPU's figures on CUDA):

- load: the peak resident memory up to the start of training (preparation, the model load, every weight paged in);
- train: the peak during training (the high-water mark is reset when training starts); act: that peak above the
  resident memory at the start of training (activations, and the adapter's gradients and optimizer state: a few
  MB for LoRA); peak: the larger of load and train, the figure `instructune train` compares with its plan;
- plan: the plan's peak (`instructune plan`, stated by `run_train` and kept in the model's manifest) and plan/peak;
- frozen: the bytes of every frozen weight (4-bit data and quantization constants included); 4-bit: the frozen
  bytes of the linear layers QLoRA quantizes (all but the output head) over their bf16 size (LoRA rows: the same
  layers as they are held: 2.00 fp32, 1.00 bf16);
- tokens/s over the steps after the first, the last step's loss, and on UCI the test accuracy.

Then the ratios against the anchor: QLoRA's 4-bit/bf16 bytes (target <= 0.30), checkpointing's activation cut and
tokens/s cost (e-mails: target >= 2x for <= 35 % fewer tokens/s), QLoRA's UCI accuracy against LoRA's (target
within 1.5 points), and the largest plan error (target <= 15 %).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = {"uci": "configs/uci-sentiment.yaml", "emails": "configs/email-subjects.yaml"}
BATCH = 8
METHODS = {
    "lora-fp32": {"train.method": "lora", "train.bf16": "false"},
    "lora-bf16": {"train.method": "lora", "train.bf16": "true"},
    "qlora": {"train.method": "qlora"},
    "lora-ckpt": {"train.method": "lora", "train.bf16": "false", "train.gradient_checkpointing": "true"},
    "qlora-ckpt": {"train.method": "qlora", "train.gradient_checkpointing": "true"},
}
MIB = 2**20


# -- the worker: one row, in its own process ----------------------------------------------------------------------
def status_bytes(key: str) -> int:
    """VmHWM (peak) or VmRSS (now) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def held_now(dev) -> int:
    import torch

    return torch.cuda.memory_reserved(dev) if dev.type == "cuda" else status_bytes("VmRSS")


def reset_high_water_mark(dev) -> None:
    """The peak counts from here; unlike `memory.reset_peak`, no garbage collection or `malloc_trim` first, so
    training starts from the memory the load left, as in `instructune train`."""
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def page_in(model) -> None:
    """Read every weight once. Weights loaded from safetensors without a dtype change stay memory-mapped until the
    first forward reads them, which would count them in training's peak instead of the load's."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()  # one element per 4 KiB page


def frozen_bytes(model) -> dict:
    """Bytes of the frozen weights, and of the linear layers QLoRA quantizes: held, and their bf16 size."""
    from instructune.train import memory

    params = {id(p): p for p in model.parameters()}.values()
    frozen = [p for p in params if not p.requires_grad]
    total = sum(p.numel() * p.element_size() for p in frozen) + memory.quant_state_bytes(frozen)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # each weight once: peft's LoRA layer forwards `.weight` to the 4-bit layer it wraps, which `modules()` also gives
    four_bit = list({id(m.weight): m.weight for m in base.modules()
                     if getattr(getattr(m, "weight", None), "quant_state", None) is not None}.values())
    if four_bit:
        held = sum(w.numel() * w.element_size() for w in four_bit) + memory.quant_state_bytes(four_bit)
        bf16 = sum(math.prod(w.quant_state.shape) * 2 for w in four_bit)
    else:  # the same layers, as this (LoRA) row holds them; peft's adapters are the trainable linears
        linears = list({id(m.weight): m.weight for m in memory.four_bit_linears(base)
                        if not m.weight.requires_grad}.values())
        held = sum(w.numel() * w.element_size() for w in linears)
        bf16 = sum(w.numel() * 2 for w in linears)
    return {"frozen": total, "quantized_held": held, "quantized_bf16": bf16}


def worker(args) -> None:
    """One row: prepare, train and (UCI) evaluate through the recipe's own functions; print RESULT {json}."""
    from instructune import experiment, rundir
    from instructune.config import load_config
    from instructune.runtime import device
    from instructune.tasks import prepare
    from instructune.train import memory

    model_name, data, method = args.worker
    work = Path(args.work)
    overrides = [f"model.name={model_name}", "train.epochs=1", f"output_dir={work / 'run'}", "baseline.enabled=false",
                 f"seed={args.seed}"]
    overrides += [f"{k}={v}" for k, v in METHODS[method].items()]
    if method.startswith("qlora"):
        overrides.append(f"train.bf16={str(args.qlora_bf16 == 'on').lower()}")
    steps = args.email_steps if data == "emails" else args.uci_steps
    if steps:
        overrides.append(f"tasks.0.data.max_train={steps * BATCH}")
    cfg = load_config(ROOT / DATA.get(data, data), overrides)
    dev = device()
    prep = prepare(cfg)
    run_dir = experiment.start_run(cfg, prep)
    facts: dict = {}
    real_train = experiment.train

    def train(model, *a, **kw):  # the model as run_train loaded it, just before training starts
        page_in(model)
        facts.update(load_peak=memory.peak_memory(dev), start=held_now(dev), **frozen_bytes(model))
        reset_high_water_mark(dev)
        log = real_train(model, *a, **kw)
        facts["train_peak"] = memory.peak_memory(dev)
        return log

    experiment.train = train
    try:
        out = experiment.run_train(prep, run_dir)
        accuracy = None
        if data == "uci" and not args.no_eval:
            results = experiment.run_evaluate(prep, run_dir)
            accuracy = next(iter(results.values()))["finetuned"]["metrics"]["accuracy"]
    finally:
        rundir.release()
    manifest = json.loads((out / "instructune.json").read_text())
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    result = dict(facts, planned_peak=manifest["memory"]["planned_peak"], accuracy=accuracy, bf16=cfg.train.bf16,
                  tokens=[e["tokens"] for e in log], elapsed=[e["tokens"] / e["tokens_per_s"] for e in log],
                  loss=log[-1]["loss"], steps=len(log))
    print("RESULT " + json.dumps(result), flush=True)


# -- the driver ---------------------------------------------------------------------------------------------------
def spawn(model: str, data: str, method: str, seed: int, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="instructune-reach-"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, data, method, "--work", str(work),
           "--uci-steps", str(args.uci_steps), "--email-steps", str(args.email_steps), "--qlora-bf16", args.qlora_bf16,
           "--seed", str(seed)]
    cmd += ["--no-eval"] if args.no_eval else []
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{method} on {model} / {data} failed (exit {proc.returncode})")
    print(f"  {model} {data} {method} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def tokens_per_s(r: dict) -> float:
    t, s = r["tokens"], r["elapsed"]
    if len(t) > 1 and s[-1] > s[0]:
        return (t[-1] - t[0]) / (s[-1] - s[0])  # the first step (warm-up) left out
    return t[-1] / s[-1]


def peak(r: dict) -> int:
    return max(r["load_peak"], r["train_peak"])


def act(r: dict) -> int:
    return max(0, r["train_peak"] - r["start"])


def row_line(model: str, data: str, method: str, seed: int, r: dict) -> str:
    acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
    return (f"| {model} | {data} | {method} | {seed} | {r['load_peak'] / MIB:.0f} | {r['train_peak'] / MIB:.0f} | "
            f"{act(r) / MIB:.0f} | {peak(r) / MIB:.0f} | {r['planned_peak'] / MIB:.0f} | "
            f"{r['planned_peak'] / peak(r):.2f} | {r['frozen'] / MIB:.0f} | "
            f"{r['quantized_held'] / r['quantized_bf16']:.2f} | {tokens_per_s(r):.0f} | {r['loss']:.4f} | {acc} |")


def over_seeds(model: str, data: str, runs: dict) -> list[str]:
    """Each method's test accuracy over the seeds (each seed: its own split, adapter init and data order; the
    methods of one seed share all three), and each method's difference from LoRA fp32, seed by seed and on average."""
    seeds = sorted(runs)
    if len(seeds) < 2:
        return []
    out = []
    for name in runs[seeds[0]]:
        accs = [runs[s][name]["accuracy"] for s in seeds]
        if None in accs:
            continue
        line = f"{model} {data} {name}: test accuracy over seeds {seeds}: mean {sum(accs) / len(accs):.4f} ("
        line += ", ".join(f"{a:.4f}" for a in accs) + ")"
        if name != "lora-fp32" and None not in (runs[s].get("lora-fp32", {}).get("accuracy") for s in seeds):
            diffs = [100 * (runs[s][name]["accuracy"] - runs[s]["lora-fp32"]["accuracy"]) for s in seeds]
            line += (f"; against lora-fp32 {sum(diffs) / len(diffs):+.2f} points on average (" +
                     ", ".join(f"{d:+.2f}" for d in diffs) + "; target within 1.5)")
        out.append(line)
    return out


def ratios(model: str, data: str, rows: dict) -> list[str]:
    out, anchor = [], rows.get("lora-fp32")
    for name in ("qlora", "qlora-ckpt"):
        if name in rows:
            r = rows[name]
            out.append(f"{model} {data} {name}: 4-bit layers {r['quantized_held'] / MIB:.0f} MiB = "
                       f"{r['quantized_held'] / r['quantized_bf16']:.3f}x their bf16 size "
                       f"({r['quantized_bf16'] / MIB:.0f} MiB; target <= 0.30); all frozen weights {r['frozen'] / MIB:.0f}"
                       f" MiB" + (f" ({r['frozen'] / anchor['frozen']:.2f}x LoRA fp32's {anchor['frozen'] / MIB:.0f})"
                                  if anchor else ""))
    for plain, ckpt in (("lora-fp32", "lora-ckpt"), ("qlora", "qlora-ckpt")):
        if plain in rows and ckpt in rows:
            p, c = rows[plain], rows[ckpt]
            cut = act(p) / act(c) if act(c) else float("inf")
            out.append(f"{model} {data} {ckpt} vs {plain}: activation peak {act(p) / MIB:.0f} -> {act(c) / MIB:.0f} "
                       f"MiB ({cut:.2f}x less; target >= 2x on emails), tokens/s {tokens_per_s(p):.0f} -> "
                       f"{tokens_per_s(c):.0f} ({100 * (1 - tokens_per_s(c) / tokens_per_s(p)):+.0f} % fewer; "
                       f"target <= 35 %), process peak {peak(c) / peak(p):.2f}x, loss {c['loss']:.4f} vs {p['loss']:.4f}")
    if anchor:
        for name, r in rows.items():
            if name != "lora-fp32":
                acc = (f", accuracy {100 * (r['accuracy'] - anchor['accuracy']):+.2f} points"
                       if r["accuracy"] is not None and anchor["accuracy"] is not None else "")
                out.append(f"{model} {data} {name} vs lora-fp32: peak {peak(r) / peak(anchor):.2f}x, tokens/s "
                           f"{tokens_per_s(r) / tokens_per_s(anchor):.2f}x, last loss {r['loss']:.4f} vs "
                           f"{anchor['loss']:.4f}{acc}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--data", nargs="+", default=["uci", "emails"], help="uci, emails, or config paths")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--uci-steps", type=int, default=0, help="steps of 8 on uci (default 0: one whole epoch, 175)")
    ap.add_argument("--email-steps", type=int, default=10, help="steps of 8 on emails")
    ap.add_argument("--qlora-bf16", choices=["auto", "on", "off"], default="auto",
                    help="train.bf16 in the qlora rows (auto: on where bf16 is native)")
    ap.add_argument("--no-eval", action="store_true", help="skip the UCI test accuracy")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="the experiment's seed (split, adapter init, "
                    "data order), each method once per seed; several: the accuracies' mean and spread")
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "DATA", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from instructune.allocator import chosen, preload

    if args.worker:  # a row trains under the allocator the `instructune` command would use (tcmalloc where found)
        preload()
    import torch

    from instructune.runtime import device, native_bf16

    if args.qlora_bf16 == "auto":
        args.qlora_bf16 = "on" if native_bf16(device()) else "off"
    if args.worker:
        return worker(args)

    started = time.perf_counter()
    epoch = f"{args.uci_steps} steps" if args.uci_steps else "one epoch"
    print(f"# memory reach: batch {BATCH}, seeds {' '.join(map(str, args.seeds))}; uci {epoch}, emails {args.email_steps} steps; qlora train.bf16 "
          f"{args.qlora_bf16}; torch {torch.__version__}, {torch.get_num_threads()} threads, {device()}; host allocator "
          f"{chosen()}; MiB", flush=True)
    print("\n| model | data | method | seed | load | train | act | peak | plan | plan/peak | frozen | 4-bit/bf16 | "
          "tokens/s | last loss | test accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    summary, errors = [], []
    for model in args.models:
        for data in args.data:
            runs = {}
            for seed in args.seeds:
                rows = runs[seed] = {}
                for method in args.methods:
                    rows[method] = spawn(model, data, method, seed, args)
                    print(row_line(model, data, method, seed, rows[method]), flush=True)
                    errors.append(abs(rows[method]["planned_peak"] - peak(rows[method])) / peak(rows[method]))
                summary += ratios(model, data if len(args.seeds) == 1 else f"{data} seed {seed}", rows)
            summary += over_seeds(model, data, runs)
    print("\n" + "\n".join(summary))
    print(f"\nlargest plan error against the measured peak: {100 * max(errors):.1f} % (target <= 15 %)")
    print(f"# {time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
