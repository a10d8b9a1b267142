"""Two choices in the training pass, each against what it replaced, on SmolLM2-135M (fp32, this machine's threads):

1. `train/fused.py`'s leaner RMSNorm/SwiGLU backward against autograd's: seconds per forward + backward (the two
   alternated, best of `--reps`) and the activations the forward leaves for backward (tcmalloc's allocated bytes;
   run under the `instructune` command's tcmalloc, which this script starts itself again under), for full
   fine-tuning and LoRA;
2. where the shared prompt prefix cannot run as a pass of its own (FSDP, activation checkpointing), one fused row
   (the prefix once, a 4-D mask) against padded rows that each repeat the prefix (`collate.FUSED_ALONE_MAX`).

    .venv/bin/python benchmarks/lean_layers.py            # with nothing else busy: the seconds mean something

Prints one line per case with the ratio of the new to the old.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from instructune.allocator import preload  # noqa: E402


def allocated() -> int:
    """tcmalloc's bytes in use (0 under another allocator)."""
    value, lib = ctypes.c_size_t(0), ctypes.CDLL(None)
    get = getattr(lib, "MallocExtension_GetNumericProperty", None)
    return value.value if get and get(b"generic.current_allocated_bytes", ctypes.byref(value)) else 0


def timed(step, reps: int) -> tuple[float, int]:
    """Best seconds of `reps` calls of `step() -> bytes held after the forward`, and those bytes."""
    best, held = float("inf"), 0
    for _ in range(reps):
        start = time.perf_counter()
        held = step()
        best = min(best, time.perf_counter() - start)
    return best, held


def lean_vs_autograd(model, rows: int, tokens: int, reps: int, label: str) -> None:
    import torch

    from instructune.train.fused import lean_blocks

    ids = torch.randint(0, 49000, (rows, tokens), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, -10:] = True

    def step() -> int:
        before = allocated()
        out = model(input_ids=ids, logits_to_keep=keep, use_cache=False)
        held = allocated() - before
        torch.nn.functional.cross_entropy(out.logits.float(), ids[keep]).backward()
        model.zero_grad(set_to_none=True)
        return held

    step()  # warm-up
    results = {"autograd": (float("inf"), 0), "lean": (float("inf"), 0)}
    for _ in range(reps):  # alternated, so a slower minute hits both
        for arm in results:
            with lean_blocks(model) if arm == "lean" else contextlib.nullcontext():
                s, held = timed(step, 1)
            results[arm] = (min(results[arm][0], s), held)
    (a, ha), (b, hb) = results["autograd"], results["lean"]
    print(f"{label}, {rows} x {tokens} tokens: autograd {a:.2f} s, {ha / 1e9:.2f} GB kept; lean {b:.2f} s, "
          f"{hb / 1e9:.2f} GB kept; lean / autograd: time {b / a:.2f}x, activations {hb / max(ha, 1):.2f}x")


def fused_vs_padded(model, prefix: int, own: int, reps: int) -> None:
    import torch

    from instructune.prompts.format import IGNORE, Encoded
    from instructune.train.collate import collate
    from instructune.train.loss import completion_loss_sum

    g = torch.Generator().manual_seed(1)
    shared = torch.randint(10, 40000, (prefix,), generator=g).tolist()
    examples = []
    for _ in range(8):
        ids = shared + torch.randint(10, 40000, (own,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE] * (len(ids) - 2) + ids[-2:]))
    cases = {"padded": collate(examples, 0, min_shared=16, two_pass=False),
             "fused": collate(examples, 0, min_shared=16, fused=True, two_pass=False)}
    if cases["fused"]["input_ids"].shape[0] != 1:
        print(f"prefix {prefix} + 8 x {own}: longer than FUSED_ALONE_MAX, padded rows either way")
        return
    found = {}
    for name, batch in cases.items():
        def step(batch=batch) -> int:
            before = allocated()
            loss = completion_loss_sum(model, batch)
            held = allocated() - before
            loss.backward()
            model.zero_grad(set_to_none=True)
            return held
        step()
        found[name] = timed(step, reps)
    (a, ha), (b, hb) = found["padded"], found["fused"]
    print(f"prefix {prefix} + 8 x {own}: padded {tuple(cases['padded']['input_ids'].shape)} {a:.2f} s, "
          f"{ha / 1e9:.2f} GB; fused {tuple(cases['fused']['input_ids'].shape)} {b:.2f} s, {hb / 1e9:.2f} GB; "
          f"fused / padded: time {b / a:.2f}x, activations {hb / max(ha, 1):.2f}x")


def main() -> None:
    preload()  # the command's allocator (tcmalloc where found), so the bytes kept can be read
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from instructune.config import ModelConfig
    from instructune.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    source = resolve_model(ModelConfig(name="smollm2-135m"))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).train()
    print(f"SmolLM2-135M, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; tcmalloc bytes "
          f"{'read' if allocated() else 'unavailable (another allocator): 0'}")
    lean_vs_autograd(model, 8, 83, args.reps, "full fine-tuning")
    for prefix, own in ((43, 40), (43, 58)):
        fused_vs_padded(model, prefix, own, args.reps)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    lean_vs_autograd(lora, 8, 300, args.reps, "LoRA r 16")


if __name__ == "__main__":
    main()
