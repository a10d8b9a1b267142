"""Memory per process, measured against the plan: full fine-tuning of a real preset with 1 and 2 processes, DDP and
FSDP (PyTorch FSDP2 over gloo on this CPU).

Not a test: run it by hand, with nothing else busy (the 2-process runs share this machine's cores):

    .venv/bin/python benchmarks/memory_scaling.py                       # SmolLM2-135M, 6 steps of batch 8
    .venv/bin/python benchmarks/memory_scaling.py --model gemma3-270m --steps 4
    .venv/bin/python benchmarks/memory_scaling.py --batch 4 --set train.max_grad_norm=null   # any config override

Each setting is one `instructune train` (through `torchrun` for 2 processes) on the vendored UCI sentiment data
(configs/uci-sentiment.yaml, `train.method: full` at `train.lr: 5e-5`, the default for full fine-tuning: the config's
5e-4 is its LoRA rate, at which full fine-tuning is unstable), in a fresh run folder. What is printed comes from the trained
model's manifest (`memory`: what `train` measured in every process at the end of training) and its training log:

- state: the bytes of weights, gradients and optimizer state each process held, counted from its tensors (under
  FSDP: its shards), against the plan's figure for the same part;
- peak: each process's peak resident memory (VmHWM from the start of `run_train`: loading the model included; under
  FSDP each process builds the model on the meta device and reads only its shards), against the plan's peak;
- tokens/s: training throughput over all processes;
- loss gap: the largest relative difference of a step's loss from the one process's (the same global batch: one
  process takes both processes' examples per step, as two accumulated micro-batches of the same size).

Targets (issues 13 and 20): FSDP with 2 processes at most 0.6x DDP's per-process state and at most 0.65x its peak,
losses equal to one process's within 1e-5, the planned peak within 15 % of each measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def run_one(model: str, processes: int, strategy: str, steps: int, batch: int, work: Path, threads: int = 0,
            extra: tuple = ()) -> dict:
    """One `instructune train` of `steps` steps of a global batch of 2 x `batch`: micro-batches of `batch`, two
    accumulated in one process, one in each of two (the same passes, so the losses differ only by the order in
    which the two halves' gradients are summed)."""
    name = f"mem-{strategy}-{processes}"
    overrides = [f"model.name={model}", "train.method=full", f"train.strategy={strategy}",
                 f"train.batch_size={batch}", f"train.grad_accum={2 // processes}", "train.epochs=1",
                 f"tasks.0.data.max_train={steps * 2 * batch}", "train.max_validation=8",
                 f"output_dir={work / name}", "train.max_length=128", "train.lr=5e-5", *extra]
    cli = [sys.executable, "-m", "instructune.cli", "train", str(ROOT / "configs/uci-sentiment.yaml")]
    cli += [a for o in overrides for a in ("--set", o)]
    threads = threads or max(1, os.cpu_count() // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if processes > 1:
        cli = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", "29533", *cli[1:]]
    print(f"-- {strategy} x {processes}: {' '.join(cli[-2 * len(overrides) - 2:])}", flush=True)
    done = subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    plan_line = next((l for l in done.stderr.splitlines() + done.stdout.splitlines() if "memory plan:" in l), "")
    manifest = json.loads((work / name / "model" / "instructune.json").read_text())
    log = [json.loads(l) for l in (work / name / "train_log.jsonl").read_text().splitlines()]
    shutil.rmtree(work / name)
    mem = manifest["memory"]
    planned = mem["planned"]
    return {"strategy": strategy, "processes": processes, "plan_line": plan_line.strip(),
            "state": max(w + g + o for w, g, o in zip(mem["weights"], mem["gradients"], mem["optimizer"])),
            "planned_state": planned["weights"] + planned["gradients"] + planned["optimizer"],
            "peak": max(mem["peak"]), "planned_peak": mem["planned_peak"],
            "tokens_per_s": log[-1]["tokens_per_s"], "losses": [e["loss"] for e in log],
            "allocator": mem.get("host_allocator", "glibc")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="per process (default: the cores over the processes)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    args = ap.parse_args()
    settings = [(1, "ddp"), (2, "ddp"), (2, "fsdp")]
    with tempfile.TemporaryDirectory(prefix="instructune-mem-") as tmp:
        rows = [run_one(args.model, n, s, args.steps, args.batch, Path(tmp), args.threads, tuple(args.set))
                for n, s in settings]
    print(f"\n{args.model}, full fine-tuning, fp32, {args.steps} steps of a global batch of {2 * args.batch}; GB per "
          f"process; host allocator {', '.join(sorted({r['allocator'] for r in rows}))} "
          "(INSTRUCTUNE_ALLOCATOR=system for glibc's)\n")
    print("| setting | state measured | state planned | peak measured | peak planned | plan error | loss gap | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        err = (r["planned_peak"] - r["peak"]) / r["peak"]
        gap = max(abs(a - b) / max(abs(a), abs(b)) for a, b in zip(r["losses"], rows[0]["losses"]))
        print(f"| {r['strategy']} x {r['processes']} | {r['state'] / GB:.2f} | {r['planned_state'] / GB:.2f} | "
              f"{r['peak'] / GB:.2f} | {r['planned_peak'] / GB:.2f} | {100 * err:+.1f} % | {gap:.1e} | "
              f"{r['tokens_per_s']:.0f} |")
    for r in rows[1:]:  # where the gap comes from: the first step (same weights) or the later ones
        gaps = [abs(a - b) / max(abs(a), abs(b)) for a, b in zip(r["losses"], rows[0]["losses"])]
        print(f"loss gap by step, {r['strategy']} x {r['processes']}: " + " ".join(f"{g:.1e}" for g in gaps))
    ddp2, fsdp2 = rows[1], rows[2]
    print(f"\nFSDP x 2 / DDP x 2, weights + gradients + optimizer per process: {fsdp2['state'] / ddp2['state']:.2f}x "
          f"(target <= 0.6x); peak: {fsdp2['peak'] / ddp2['peak']:.2f}x (target <= 0.65x)")
    worst = max(abs(r["planned_peak"] - r["peak"]) / r["peak"] for r in rows)
    print(f"largest plan error against the measured peak: {100 * worst:.1f} % (target <= 15 %)")


if __name__ == "__main__":
    main()
