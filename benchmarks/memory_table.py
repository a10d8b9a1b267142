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
    print("| model | method | parameters (trained) | DDP per GPU | DDP fits? | FSDP GPUs needed, instructune today "
          "(whole model loaded first) | FSDP GPUs needed, sharded state alone (per GPU) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shape_args in MODELS.items():
        config = LlamaConfig(**shape_args)
        for method in ("lora", "full"):
            shape = model_shape(config, method, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
            plan = dict(tokens=args.seq, supervised=args.seq // 4, method=method, bf16=True)
            ddp = footprint(shape, "ddp", 2, **plan)
            cells = []
            for whole in (True, False):
                n = next((n for n in range(1, 4097) if footprint(shape, "fsdp", n, whole_load=whole, **plan).fits(limit)),
                         None)
                peak = footprint(shape, "fsdp", n, whole_load=whole, **plan).peak / GB if n else None
                cells.append(f"{n} ({peak:.1f} GB)" if n else ("none: the whole model is loaded on each GPU first"
                                                              if whole else "none: activations alone exceed it"))
            print(f"| {name} | {method} | {shape.parameters / 1e9:.2f} B ({shape.trainable / 1e9:.3g} B) | "
                  f"{ddp.peak / GB:.1f} | {'yes' if ddp.fits(limit) else 'no'} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
