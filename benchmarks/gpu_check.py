"""The GPU check of issue 24, run by `benchmarks/gpu_check.sh` (which sets the paths): LoRA, QLoRA and activation
checkpointing on random-init weights of real shapes, bf16; instructune's memory plan against what the GPU held;
tokens/s against TRL's `SFTTrainer` (LoRA, and QLoRA with bitsandbytes NF4 + double quantization) in the same run.

Not a test. Per model (SmolLM2-1.7B, Llama-3.1-8B: their published configs, written below; the weights are random,
saved once to a temporary folder so that both tools load them as they load any model), in this order, each row
`--steps` optimizer steps of `--batch` random examples of 3/4 to all of `--seq` tokens (the last `--completion`
trained), the same examples in the same order for every row:

    instructune lora, TRL lora, instructune qlora, TRL qlora, instructune lora + checkpointing, qlora + checkpointing

instructune rows go through `models.training_model` and `train.loop.train` (its defaults: `pass_tokens`, logits only
at the trained positions); TRL rows through `SFTTrainer` with LoRA r=16 alpha=32 on all linear layers (as
instructune's), gradient checkpointing off (`--trl-checkpointing` adds TRL rows with it on), bf16. Each row starts
from `torch.cuda.reset_peak_memory_stats()` before its model is loaded and frees everything after it, so the peaks
are per row. Printed: tokens/s (leaving out the first step), the last step's loss,
`torch.cuda.max_memory_allocated`, the process's peak as instructune measures it (the allocator's reserved peak plus
what it does not see: the CUDA context), the plan's peak (`instructune plan`'s figure) over that peak, and the plan
without its `runtime` (the context) and `allocator` (kept reserved) terms over `max_memory_allocated`, the load
time, and what the GPU still held from earlier rows when the row started (should be ~0). Rows that would start after
`--budget` seconds are skipped, so the whole stays within 8 minutes.

`--cpu-smoke`: a tiny Llama shape on the CPU (fp32), the same code path, so the logic is checked where no GPU is.
Without it and without a GPU, it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.machinery
import os
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
LR = 2e-4

# The published configs (config.json on the Hub), as LlamaConfig arguments.
SHAPES = {
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=130000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
ROWS = [("instructune", "lora", False), ("trl", "lora", False), ("instructune", "qlora", False),
        ("trl", "qlora", False), ("instructune", "lora", True), ("instructune", "qlora", True)]
PAD = 0  # the pad id of both tools (the tokenizer below); random tokens are drawn from 3 up


class _Absent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stand-ins for `datasets`, `pandas` and `pyarrow` where they are not installed (the GPU machine: pyarrow alone
    is well over 64 MiB). TRL imports them at module level but, with a ready dataset (`skip_prepare_dataset`), never
    calls them: any name imported from a stand-in is an empty class. Last on `sys.meta_path`: real packages win."""

    NAMES = ("datasets", "pandas", "pyarrow")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.NAMES:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.stand_in = True
        module.__getattr__ = lambda attr: _empty_class(spec.name, attr)
        return module

    def exec_module(self, module):
        pass


_EMPTY: dict = {}


def _empty_class(module: str, name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _EMPTY.setdefault((module, name), type(name, (), {"__module__": module}))  # one class per name


def setup_paths(vendor: str | None) -> None:
    """src/ first (this checkout's instructune); the vendored packages after the machine's own; no progress bars
    from instructune's loop between the table's rows."""
    sys.path.insert(0, str(ROOT / "src"))
    if vendor:
        sys.path.append(vendor)
    sys.meta_path.append(_Absent())
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub when a trainer starts
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, asked by TRL and peft
    from instructune.train import loop

    bar = loop.tqdm
    loop.tqdm = lambda *a, **k: bar(*a, **{**k, "disable": True})


def trl_dataset(data):
    """A ready dataset for TRL (`skip_prepare_dataset`): input ids and labels (-100 on the prompt), in this order.
    Without the `datasets` package, a list that passes for its `Dataset` (TRL checks the type, then only iterates)."""
    import datasets

    columns = {"input_ids": [e.input_ids for e in data], "labels": [e.labels for e in data]}
    if not getattr(datasets, "stand_in", False):
        return datasets.Dataset.from_dict(columns)

    class Rows(datasets.Dataset):
        column_names = list(columns)
        cache_files: list = []  # TRL's telemetry asks (off here: HF_HUB_DISABLE_TELEMETRY)

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {k: v[i] for k, v in columns.items()}

        def __iter__(self):
            return (self[i] for i in range(len(self)))

    return Rows()


def examples(args, vocab: int):
    """`steps * batch` random examples: 3/4 to all of `seq` tokens, the last `completion` of them trained."""
    import random

    from instructune.prompts.format import Encoded

    rng = random.Random(0)
    out = []
    for _ in range(args.steps * args.batch):
        n = rng.randint(3 * args.seq // 4, args.seq)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        out.append(Encoded(ids, [-100] * (n - args.completion) + ids[n - args.completion:]))
    return out


def step_order(encoded, batch: int) -> list[int]:
    """instructune's order of the examples (seed 0), which TRL then reads sequentially: the same steps."""
    from instructune.train.batching import length_grouped_batches

    return [i for g in length_grouped_batches([len(e.input_ids) for e in encoded], batch, 0) for i in g]


def tokenizer(config):
    """A tokenizer for TRL (it wants one for its pad token): the model's special ids, no words (the data is ids)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"<pad>": PAD, "<bos>": config.bos_token_id, "<eos>": config.eos_token_id},
                                unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def random_weights(name: str, folder: Path, dev, dtype):
    """The model of this shape with random weights (the model's own initialisation), saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[name])
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    free(dev)
    return config


def free(dev) -> None:
    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def start_row(dev) -> tuple[float, int | None]:
    """The clock and what the GPU still holds from earlier rows (should be ~0: every row frees its model)."""
    import torch

    from instructune.train import memory

    free(dev)
    memory.reset_peak(dev)  # the GPU's peak statistics (the CPU: the resident high-water mark)
    torch.manual_seed(0)
    return time.perf_counter(), torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None


def peaks(dev) -> dict:
    import torch

    from instructune.train import memory

    allocated = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {"max_allocated": allocated, "peak": memory.peak_memory(dev)}


def run_instructune(folder: Path, config, method: str, checkpointing: bool, data, args, dev) -> dict:
    from instructune.config import LoraConfig, ModelConfig, TrainConfig
    from instructune.models import training_model
    from instructune.train import loop, memory

    lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    cfg = TrainConfig(method=method, gradient_checkpointing=checkpointing, bf16=args.bf16, batch_size=args.batch,
                      epochs=1.0, lr=LR, warmup_ratio=0.0, max_length=args.seq + 1, lora=lora,
                      **({"pass_tokens": args.pass_tokens} if args.pass_tokens is not None else {}))
    started, held = start_row(dev)
    model = training_model(str(folder), ModelConfig(name=str(folder)), cfg)
    loaded = time.perf_counter() - started
    shape = memory.model_shape(config, method, lora)
    tokens, supervised = memory.pass_size([len(e.input_ids) for e in data], [e.n_supervised for e in data],
                                          cfg.batch_size, cfg.pass_tokens)
    plan = memory.footprint(shape, "ddp", 1, tokens, supervised, device=dev.type, **memory.plan_options(cfg))
    log = loop.train(model, data, [], cfg, PAD, seed=0)
    result = {"tokens": [e["tokens"] for e in log], "elapsed": [e["tokens"] / e["tokens_per_s"] for e in log],
              "loss": log[-1]["loss"], "load_s": loaded, "held": held, **peaks(dev), "plan": plan.peak,
              "plan_outside": plan.parts.get("runtime", 0) + plan.parts.get("allocator", 0), "pass_tokens": cfg.pass_tokens}
    del model
    return result


def run_trl(folder: Path, config, method: str, checkpointing: bool, data, args, dev) -> dict:
    import peft
    import torch
    import trl
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    started, held = start_row(dev)
    extra = {}
    if method == "qlora":  # TRL's QLoRA recipe: NF4, double quantization, bf16 compute
        extra = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": dev}, **extra)
    loaded = time.perf_counter() - started
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    sft = trl.SFTConfig(
        output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, report_to=[], save_strategy="no",
        bf16=args.bf16, fp16=False, use_cpu=dev.type == "cpu", dataloader_num_workers=0, seed=0,
        max_length=args.seq + 1, packing=False, train_sampling_strategy="sequential",
        gradient_checkpointing=checkpointing, disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False)
    marks, counted = [], []

    def mark():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        marks.append(time.perf_counter())

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            mark()

        def on_step_end(self, *a, **k):
            mark()

    class Counting(trl.SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            counted.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *rest, **kw)

    trainer = Counting(model=model, args=sft, train_dataset=trl_dataset(data), processing_class=tokenizer(config),
                       peft_config=lora, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # its per-step log lines would split the table
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    tokens = [sum(counted[: i + 1]) for i in range(len(counted))]
    result = {"tokens": tokens, "elapsed": [m - marks[0] for m in marks[1:]], "loss": losses[-1], "load_s": loaded,
              "held": held, **peaks(dev), "plan": None}
    del trainer, model
    return result


def tokens_per_s(r: dict) -> float:
    t, s = r["tokens"], r["elapsed"]
    if len(t) > 1 and s[-1] > s[0]:
        return (t[-1] - t[0]) / (s[-1] - s[0])  # the first step (kernel and allocator warm-up) left out
    return t[-1] / s[-1]


def gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def row_line(model: str, tool: str, method: str, ckpt: bool, r: dict) -> str:
    name = method + (" + ckpt" if ckpt else "")
    if "error" in r:
        return f"| {model} | {tool} | {name} | {r['error']} |" + " |" * 8
    plan, peak, alloc = r["plan"], r["peak"], r["max_allocated"]
    vs_peak = f"{plan / peak:.2f}" if plan and peak else "-"
    vs_alloc = f"{(plan - r['plan_outside']) / alloc:.2f}" if plan and alloc else "-"
    return (f"| {model} | {tool} | {name} | {tokens_per_s(r):.0f} | {r['loss']:.4f} | {gb(alloc)} | {gb(peak)} | "
            f"{gb(plan)} | {vs_peak} | {vs_alloc} | {r['load_s']:.0f} | {gb(r['held'])} |")


def ratios(model: str, results: dict) -> list[str]:
    lines = []
    for method in ("lora", "qlora"):
        ours, theirs = results.get(("instructune", method, False)), results.get(("trl", method, False))
        if ours and theirs and "error" not in ours and "error" not in theirs:
            lo, lt = ours["loss"], theirs["loss"]
            mem = (f"{ours['max_allocated'] / theirs['max_allocated']:.2f}x" if theirs["max_allocated"] else
                   f"{ours['peak'] / theirs['peak']:.2f}x (process peaks)")
            lines.append(f"{model} {method}: instructune vs TRL tokens/s {tokens_per_s(ours):.0f} vs {tokens_per_s(theirs):.0f} "
                         f"({tokens_per_s(ours) / tokens_per_s(theirs):.2f}x), memory {mem}, last loss {lo:.4f} vs "
                         f"{lt:.4f} ({(lo / lt - 1) * 100:+.1f} %)")
        plain, ckpt = results.get(("instructune", method, False)), results.get(("instructune", method, True))
        if plain and ckpt and "error" not in plain and "error" not in ckpt:
            key = "max_allocated" if plain["max_allocated"] else "peak"
            lines.append(f"{model} {method} + checkpointing vs without: peak {ckpt[key] / plain[key]:.2f}x, "
                         f"tokens/s {tokens_per_s(ckpt) / tokens_per_s(plain):.2f}x")
    return lines


def real_plans() -> list[str]:
    """--cpu-smoke: the plan of every instructune row at the GPU run's default sizes (the models built on the meta
    device: no weights), which checks that the configs written above load here."""
    from transformers import LlamaConfig

    from instructune.config import LoraConfig, TrainConfig
    from instructune.train import memory

    lines, lora = [], LoraConfig(r=16, alpha=32, target_modules="all-linear")
    for name in ("smollm2-1.7b", "llama-3.1-8b"):
        config = LlamaConfig(**SHAPES[name])
        for method in ("lora", "qlora"):
            shape = memory.model_shape(config, method, lora)
            for ckpt in (False, True):
                cfg = TrainConfig(method=method, gradient_checkpointing=ckpt, bf16=True, batch_size=4, lora=lora)
                tokens, supervised = memory.pass_size([1024] * 4, [64] * 4, 4, cfg.pass_tokens)
                plan = memory.footprint(shape, "ddp", 1, tokens, supervised, device="cuda",
                                        **memory.plan_options(cfg))
                lines.append(f"plan at the GPU sizes: {name} {method}{' + ckpt' if ckpt else ''}: {plan.line()}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vendor-dir", help="the vendored packages (gpu_check.sh passes benchmarks/.gpu_vendor)")
    ap.add_argument("--models", nargs="+", default=["smollm2-1.7b", "llama-3.1-8b"], choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per row (tokens/s leaves out the first)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024, help="longest example in tokens (each is 3/4 to all of it)")
    ap.add_argument("--completion", type=int, default=64, help="trained tokens at the end of each example")
    ap.add_argument("--pass-tokens", type=int, default=None, help="instructune's train.pass_tokens (default: its own)")
    ap.add_argument("--trl-checkpointing", action="store_true", help="also TRL rows with gradient checkpointing on")
    ap.add_argument("--budget", type=float, default=380, help="start no row after this many seconds")
    ap.add_argument("--work", default=None, help="folder for the random weights (default: a temporary one)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape, CPU, fp32, 2 steps: checks the logic")
    args = ap.parse_args()
    setup_paths(args.vendor_dir)

    import torch

    if args.cpu_smoke:
        args.models, args.steps, args.batch, args.seq, args.completion = ["tiny"], 3, 2, 48, 8
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}): run it on the GPU machine, or with --cpu-smoke to check the logic on this CPU",
              file=sys.stderr)
        raise SystemExit(2)
    else:
        dev = torch.device("cuda", 0)
    args.bf16 = dev.type == "cuda"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    rows = ROWS + ([("trl", "lora", True), ("trl", "qlora", True)] if args.trl_checkpointing else [])
    import bitsandbytes
    import transformers
    import trl

    what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (--cpu-smoke)"
    print(f"# gpu_check: {what}; torch {torch.__version__}, transformers {transformers.__version__}, trl "
          f"{trl.__version__}, bitsandbytes {bitsandbytes.__version__}; {'bf16' if args.bf16 else 'fp32'}, batch "
          f"{args.batch} x up to {args.seq} tokens ({args.completion} trained), {args.steps} steps per row, LoRA r=16 "
          "all-linear; QLoRA nf4 + double quantization", flush=True)
    print("| model | tool | method | tokens/s | last loss | max allocated GB | peak GB | plan GB | plan / peak | "
          "plan of tensors / allocated | load s | held before GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    began = time.perf_counter()
    own_work = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="instructune-gpu-check-"))
    args.work = str(work)
    summary = []
    try:
        for name in args.models:
            if time.perf_counter() - began > args.budget:
                print(f"| {name} | - | - | skipped: past the {args.budget:.0f} s budget |" + " |" * 8, flush=True)
                continue
            folder = work / name
            config = random_weights(name, folder, dev, dtype)
            data = examples(args, config.vocab_size)
            ordered = [data[i] for i in step_order(data, args.batch)]  # instructune's steps, which TRL reads in order
            results = {}
            for tool, method, ckpt in rows:
                if time.perf_counter() - began > args.budget:
                    results[(tool, method, ckpt)] = {"error": f"skipped: past the {args.budget:.0f} s budget"}
                else:
                    try:
                        results[(tool, method, ckpt)] = (
                            run_instructune(folder, config, method, ckpt, data, args, dev) if tool == "instructune"
                            else run_trl(folder, config, method, ckpt, ordered, args, dev))
                    except Exception as e:  # one failed row (out of memory, a library's refusal) is reported
                        results[(tool, method, ckpt)] = {"error": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                    free(dev)
                print(row_line(name, tool, method, ckpt, results[(tool, method, ckpt)]), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            summary += ratios(name, results)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + "\n".join(summary))
    if args.cpu_smoke:
        print("\n" + "\n".join(real_plans()))
    print(f"\n# {time.perf_counter() - began:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
