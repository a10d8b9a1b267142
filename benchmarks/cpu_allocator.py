"""What the C allocator keeps on a CPU: LoRA passes of varying shape under glibc, tcmalloc, jemalloc and exact
allocation, each in a process of its own.

Training on a CPU allocates and frees a pass's activations at every pass; glibc serves them from a heap that
fragments when shapes vary (the e-mail subjects' steps: 2 to 8 rows of 100 to 384 tokens), so the process keeps far
more than the bytes in use (README, "Memory per process"). This probe runs the same passes (SmolLM2-135M LoRA r 16 on
all linear layers, AdamW steps, seeded random shapes) under each allocator and prints the peak resident memory above
what the process held before the first pass, after 1, 4, half and all passes, and the seconds per pass.

    .venv/bin/python benchmarks/cpu_allocator.py                  # the allocators found on this machine
    .venv/bin/python benchmarks/cpu_allocator.py --passes 12 --tcmalloc /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

tcmalloc / jemalloc: Debian's `libtcmalloc-minimal4` / `libjemalloc2` (`apt-get download` and `dpkg-deb -x` need no
root), loaded by LD_PRELOAD. Exact allocation: glibc with `M_MMAP_THRESHOLD` at 1 MiB (every larger block is its own
mapping, returned when freed). Run it with nothing else busy for the seconds to mean anything.
"""

from __future__ import annotations

import argparse
import ctypes.util
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe(passes: int, seed: int) -> dict:
    """In this process: the passes, and the peaks (bytes above the start) after 1, 4, half and all of them."""
    import gc
    import random
    import time

    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from instructune.config import ModelConfig, TrainConfig
    from instructune.models import resolve_model, training_model
    from instructune.train.loss import completion_loss_sum

    torch.manual_seed(seed)
    source = resolve_model(ModelConfig(name="smollm2-135m"))
    model = training_model(source, ModelConfig(name=source), TrainConfig(
        method="lora", lora={"r": 16, "alpha": 32, "target_modules": "all-linear"}))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def step(rows: int, length: int, supervised: int = 12) -> None:
        ids = torch.randint(0, 49000, (rows, length))
        keep = torch.zeros(rows, length, dtype=torch.bool)
        keep[:, -supervised - 1:-1] = True
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.arange(length).expand(rows, -1), "logits_to_keep": keep,
                 "targets": ids[:, -supervised:].reshape(-1)}
        completion_loss_sum(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rng = random.Random(seed)
    shapes = []
    for _ in range(passes):
        length = rng.randint(100, 384)
        shapes.append((max(1, min(8, 2048 // length)), length))
    step(1, 64, 2)  # the optimizer's state and the first small pass: not what this measures
    gc.collect()
    start = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    began, peaks = time.perf_counter(), []
    for rows, length in shapes:
        step(rows, length)
        peaks.append(status("VmHWM:") - start)
    seconds = (time.perf_counter() - began) / passes
    marks = sorted({0, min(3, passes - 1), passes // 2, passes - 1})
    return {"start_gb": start / 1e9, "peaks_gb": {i + 1: peaks[i] / 1e9 for i in marks}, "s_per_pass": seconds}


def find(name: str, pattern: str) -> str | None:
    found = ctypes.util.find_library(name)
    if found:
        hits = glob.glob(f"/usr/lib/*/{found}") + glob.glob(f"/usr/lib/{found}")
        if hits:
            return hits[0]
    hits = sorted(glob.glob(pattern))
    return hits[0] if hits else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tcmalloc", default=find("tcmalloc_minimal", "/usr/lib/*/libtcmalloc_minimal.so.4*"))
    ap.add_argument("--jemalloc", default=find("jemalloc", "/usr/lib/*/libjemalloc.so.2"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if os.environ.get("PROBE_EXACT"):
            assert ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD: 1 MiB, fixed
        print(json.dumps(probe(args.passes, args.seed)))
        return
    settings = {"glibc": {}, "exact allocation (glibc, 1 MiB mmap threshold)": {"PROBE_EXACT": "1"}}
    for name, path in (("tcmalloc", args.tcmalloc), ("jemalloc", args.jemalloc)):
        if path:
            settings[f"{name} ({path})"] = {"LD_PRELOAD": path, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
        else:
            print(f"{name}: not found on this machine (pass --{name} PATH)")
    print(f"{args.passes} LoRA passes of 2-8 rows x 100-384 tokens, SmolLM2-135M; peak GB above the start after "
          "1 / 4 / half / all passes; seconds per pass")
    for name, extra in settings.items():
        env = {**os.environ, **extra, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        done = subprocess.run([sys.executable, __file__, "--child", "--passes", str(args.passes), "--seed",
                               str(args.seed)], env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        peaks = " / ".join(f"{v:.2f}" for v in r["peaks_gb"].values())
        print(f"| {name} | start {r['start_gb']:.2f} | {peaks} | {r['s_per_pass']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
