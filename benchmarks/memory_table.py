"""On paper, from the accounting `instructune plan` uses (`instructune.train.memory`): how many 80 GB GPUs a 1B,
an 8B and a 70B model need for LoRA and for full fine-tuning, under DDP and FSDP. Nothing is measured here and no
weight is read: each model is built on the meta device from its published shape (Llama 3.2 1B, Llama 3.1 8B and
70B), and LoRA is applied by peft as training applies it.

    .venv/bin/python benchmarks/memory_table.py                       # the README's table
    .venv/bin/python benchmarks/memory_table.py --seq 2048 --gpu-gb 141

Assumptions (printed with the table): one sequence of `--seq` tokens per forward pass (`train.pass_tokens` at its
default splits a batch into such passes; accumulate for a larger batch), a quarter of the tokens supervised,
`train.bf16` (bf16 compute; LoRA keeps its frozen weights in bf16, full fine-tuning keeps fp32 weights and AdamW
state: 16 bytes a parameter), LoRA r 16 on all linear layers, no activation checkpointing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from instructune.config import LoraConfig  # noqa: E402
from instructune.train.memory import GB, footprint, model_shape  # noqa: E402

MODELS = {  # published shapes (config.json of meta-llama/Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B)
    "1B (Llama 3.2 1B)": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8B (Llama 3.1 8B)": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "70B (Llama 3.1 70B)": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                tie_word_embeddings=False),
}


def main() -> None:
    from transformers import LlamaConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    args = ap.parse_args()
    limit = args.gpu_gb * GB
    print(f"GB per GPU; {args.seq}-token passes, a quarter supervised, bf16, LoRA r 16 all-linear; fits: "
          f"peak <= 90 % of {args.gpu_gb:g} GB (fragmentation, communication buffers)\n")
    print("| model | method | parameters (trained) | DDP per GPU | DDP fits? | FSDP GPUs needed (peak per GPU) | "
          "measured or computed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shape_args in MODELS.items():
        config = LlamaConfig(**shape_args)
        for method in ("lora", "full"):
            shape = model_shape(config, method, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
            plan = dict(tokens=args.seq, supervised=args.seq // 4, method=method, bf16=True, device="cuda")
            ddp = footprint(shape, "ddp", 2, **plan)
            n = next((n for n in range(1, 4097) if footprint(shape, "fsdp", n, **plan).fits(limit)), None)
            fsdp = f"{n} ({footprint(shape, 'fsdp', n, **plan).peak / GB:.1f} GB)" if n else "none: activations exceed it"
            print(f"| {name} | {method} | {shape.parameters / 1e9:.2f} B ({shape.trainable / 1e9:.3g} B) | "
                  f"{ddp.peak / GB:.1f} | {'yes' if ddp.fits(limit) else 'no'} | {fsdp} | computed (the plan) |")
    one_gpu(args.seq)


ONE_GPU = {  # the settings people try on one GPU, as `train` keys
    "LoRA": dict(method="lora"), "LoRA + checkpointing": dict(method="lora", checkpointing=True),
    "QLoRA": dict(method="qlora"), "QLoRA + checkpointing": dict(method="qlora", checkpointing=True),
    "full": dict(method="full"), "full + checkpointing": dict(method="full", checkpointing=True)}


def one_gpu(seq: int) -> None:
    """One GPU: GB each setting needs for each model (bf16, one pass of `seq` tokens), and what fits on 16, 24 and
    80 GB (peak <= 90 %)."""
    from transformers import LlamaConfig

    peaks = {}
    for name, shape_args in MODELS.items():
        config = LlamaConfig(**shape_args)
        for label, opts in ONE_GPU.items():
            shape = model_shape(config, opts["method"], LoraConfig(r=16, alpha=32, target_modules="all-linear"))
            peaks[label, name] = footprint(shape, "ddp", 1, seq, seq // 4, bf16=True, device="cuda", **opts).peak
    models = list(MODELS)
    print(f"\nOne GPU, GB (bf16, {seq}-token passes, LoRA r 16 all-linear; QLoRA: NF4 with double quantization)\n")
    print("| setting | " + " | ".join(models) + " |")
    print("| --- |" + " --- |" * len(models))
    for label in ONE_GPU:
        print(f"| {label} | " + " | ".join(f"{peaks[label, m] / GB:.1f}" for m in models) + " |")
    for gb in (16, 24, 80):
        cells = [", ".join(l for l in ONE_GPU if peaks[l, m] <= 0.9 * gb * GB) or "none" for m in models]
        print(f"| **fits on {gb} GB** | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
