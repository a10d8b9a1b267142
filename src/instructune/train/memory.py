"""The memory plan: what each training process will hold — weights, gradients, optimizer state, activations —
under DDP and FSDP, worked out from the model's config (built on the meta device: no weight is loaded) and the
longest training batch, before a run spends anything.

The accounting (bytes per process, N processes, P parameters of which T are trained):
  weights     P x 4 (fp32; LoRA under train.bf16: the frozen P - T in bf16, x 2)      FSDP: / N
              QLoRA: each linear weight of n values that loads in 4 bits holds n / 2 bytes of packed data, one
              scale per block of 64 (fp32; double quantization: 1 byte, plus an fp32 scale and a 256-value code
              per weight for those), the 16-value code and an offset (`four_bit_bytes`, checked against what
              bitsandbytes holds); the other frozen weights as LoRA's
  gradients   T x 4, and under DDP with N > 1 the same again for its reduction buckets  FSDP: / N
  optimizer   T x 8 (AdamW's two moments, fp32)                                         FSDP: / N
  gathered    FSDP only: the full weights of the units in flight (the root unit — embeddings, final norm — and
              two decoder layers, the running one and the prefetched one); full fine-tuning also the largest
              unit's full gradient and the fp32 copy it is reduce-scattered from: the root's, at the end of
              backward (SmolLM2-135M, 2 processes: 1.65 GB live then, by tcmalloc's counters, the plan's parts
              at that moment 1.6 GB; it had counted one layer's gradient and planned 10-21 % under the peak). Tied
              embeddings in full fine-tuning free their gathered copy once the head's backward has run
              (`fsdp.release_tied_weights`); the plan still counts it, and is 4-6 % over SmolLM2's peak
  loading     FSDP: what a process holds while loading besides its shards: the rows of one weight in transit
              (the largest: the embeddings or an MLP matrix). The model is built on the meta device, sharded, and
              each process reads only its own rows of each weight from the safetensors files (`train/fsdp.py`);
              counted in the peak, though it is gone before the optimizer state exists. QLoRA on a CPU: the
              4-bit layers' full-precision size (fp32; bf16 under train.bf16), read before they are quantized; the
              process stays that much larger after loading (benchmarks/memory_reach.py, SmolLM2-135M: 420 MiB
              for 405 planned; a CUDA peak counts only what is allocated, which this is not)
  activations what backward keeps per token and layer (`Shape.kept`: fewer in the blocks `fused.lean_blocks`
              makes leaner), x the tokens of the largest pass, plus the logits at the
              supervised positions (the loss takes them nowhere else) and their softmax and gradient; full
              fine-tuning under bf16 also autocast's bf16 copies of the fp32 weights (not under FSDP); QLoRA also
              the largest 4-bit weight dequantized for its matmul. With train.gradient_checkpointing only each
              layer's input is kept (hidden values per token and layer), and one layer's activations at a time
              are recomputed in backward (`activation_parts`)
  evaluation  with train.eval_metric, the generation that scores validation inside the training process: every
              layer's key-value cache for a batch of prompts, one layer's prefill, the last logits (`generation_bytes`)
  allocator   what the allocator keeps beyond the bytes in use: `allocator_share(device)` x the largest of the
              activations, gradients and evaluation: the memory allocated and freed at every pass (the
              activations as if not checkpointed under glibc, whose heap keeps a share of all a pass allocates;
              as checkpointed under tcmalloc/jemalloc, `LIVE_BYTES`)
  runtime     the process itself (the framework, the tokenizer, the data): measured here, 0.5 GB
The peak is weights + optimizer + gathered + loading + runtime + allocator + the largest of activations, gradients and
evaluation (backward frees the one as it fills the other; `set_to_none` frees gradients before the next forward;
validation runs between steps). When an optimizer step takes several passes (a batch split by train.pass_tokens,
train.grad_accum), the gradients the first pass filled stay beside the next passes' activations: activations +
gradients (which only full fine-tuning makes large). Checked against measured peaks by benchmarks/memory_scaling.py and
benchmarks/memory_reach.py. When a plan does not fit, `fixes` names the cheapest changes that make it fit."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import warnings
from dataclasses import dataclass, field, replace

from .batching import split_by_tokens
from .collate import FUSED_ALONE_MAX, shared_prefix_length

GB = 1e9
HEADROOM = 0.9  # a plan fits when its peak is at most this share of the memory: fragmentation, communication buffers
RUNTIME = int(0.5 * GB)
# What the allocator keeps beyond the bytes in use, as a share of the memory allocated and freed at every pass (a
# pass's activations as if not checkpointed: checkpointing keeps less but recomputes as much), by device and C
# allocator (`instructune.allocator`: the `instructune` command trains under tcmalloc where it finds it). glibc on a
# CPU serves them from a heap that fragments: SmolLM2-135M LoRA, one step on each config's longest batch, 0.5x (UCI),
# 0.6x (demo) and 1.0x (e-mails) of the activations over the exact bytes, and more as shapes vary over a run (a whole
# e-mail training peaked 4.99 GB against a plan of 3.11). tcmalloc keeps much less: whole trainings of the demo, UCI
# and e-mail configs (2026-12-05) peaked 0.55x, 0.08x and 0.34x of their transient bytes above the exact plan (2.37,
# 1.74 and 2.64 GB); 0.3 puts all three within 8 %, and the full fine-tuning rows of benchmarks/memory_scaling.py
# within 12 %. jemalloc kept as little as tcmalloc in benchmarks/cpu_allocator.py; its share is tcmalloc's, unmeasured
# on whole runs. CUDA's caching allocator keeps rounded blocks reserved: an estimate from the README's H100 runs
# (allocated 7-20 % under the plan without this term), to be measured by benchmarks/gpu_check.sh.
ALLOCATOR = {"cpu-glibc": 0.75, "cpu-tcmalloc": 0.3, "cpu-jemalloc": 0.3, "cuda": 0.1}
# activations kept per token and layer: 10 x hidden + 4 x MLP width (Llama-style block); `fused.lean_blocks` keeps
# 2 x hidden fewer with its RMSNorms and 1 x MLP width fewer with its SwiGLU MLP (`Shape.kept`), not under
# activation checkpointing
PER_TOKEN_LAYER = (10, 4)


@dataclass
class Shape:
    """What the accounting needs from a model: parameter counts and the sizes activations scale with."""

    parameters: int
    trainable: int
    root: int        # parameters outside the decoder layers (embeddings, final norm, an untied head)
    layer: int       # the largest decoder layer's parameters (LoRA included)
    layers: int
    hidden: int
    mlp: int
    vocab: int
    quantized: tuple[int, ...] = ()  # QLoRA: the values of each linear weight that loads in 4 bits
    kv: int = 0      # values a layer's key-value cache holds per token (2 x key-value heads x head size)
    kept: tuple[int, int] = PER_TOKEN_LAYER  # activations per token and layer, in hidden sizes and MLP widths


@dataclass
class Footprint:
    strategy: str
    processes: int
    parts: dict = field(default_factory=dict)  # bytes per process, by part
    passes: int = 1  # forward and backward passes per optimizer step (a batch split by pass_tokens; grad_accum)

    @property
    def state(self) -> int:
        """Weights + gradients + optimizer state: the part sharding divides."""
        return sum(self.parts[k] for k in ("weights", "gradients", "optimizer"))

    @property
    def peak(self) -> int:
        p = self.parts
        # one pass: backward frees activations as it fills gradients; several: the first fills them, the next
        # passes' activations live beside them
        training = (p["activations"] + p["gradients"] if self.passes > 1 else max(p["activations"], p["gradients"]))
        return (p["weights"] + p["optimizer"] + p["gathered"] + p["loading"] + p["runtime"] + p.get("allocator", 0)
                + max(training, p.get("evaluation", 0)))

    def fits(self, memory: float) -> bool:
        return self.peak <= HEADROOM * memory

    def line(self) -> str:
        return (f"{self.strategy} x {self.processes}: ~{self.peak / GB:.2f} GB per process ("
                + ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v) + ")")


def model_shape(config, method: str, lora=None) -> Shape:
    """Counts from a transformers config: the model is built on the meta device (no memory, no weights read) and,
    for LoRA and QLoRA, wrapped by peft exactly as training wraps it (PiSSA/OLoRA factors have the same shapes as
    the default initialisation, which needs no decomposition of meta weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from . import fused

    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        model = cls.from_config(config)
        quantized = tuple(m.weight.numel() for m in four_bit_linears(model)) if method == "qlora" else ()
        if method in ("lora", "qlora"):
            from ..models import wrap_lora

            model = wrap_lora(model, lora.model_copy(update={"init": "default"}))
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    params = {id(p): p for p in model.parameters()}  # tied weights counted once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", 0)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "num_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or hidden // heads
    lean = [fused.lean_forward(m) for m in (blocks[0].modules() if blocks else ())]  # what `fused.lean_blocks` swaps
    kept = (PER_TOKEN_LAYER[0] - min(2, sum(f is fused.lean_rms_norm for f in lean)),
            PER_TOKEN_LAYER[1] - min(1, sum(f is fused.lean_mlp for f in lean)))
    return Shape(
        parameters=sum(p.numel() for p in params.values()),
        trainable=sum(p.numel() for p in params.values() if p.requires_grad),
        root=sum(p.numel() for i, p in params.items() if i not in in_blocks),
        layer=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        layers=len(blocks), hidden=hidden,
        mlp=getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None) or 4 * hidden,
        vocab=getattr(text, "vocab_size", 0), quantized=quantized, kv=2 * kv_heads * head_dim, kept=kept)


def four_bit_linears(model) -> list:
    """The linear layers transformers' bitsandbytes quantizer replaces by 4-bit ones (all but the output head, tied
    weights and the model's fp32 modules), chosen by its own rules, so the plan needs no bitsandbytes."""
    from torch import nn
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return [m for name, m in model.named_modules() if type(m) is nn.Linear and should_convert_module(name, keep)]


def four_bit_bytes(values: int, double_quant: bool) -> int:
    """What bitsandbytes holds for one 4-bit weight of `values` values (blocks of 64): the packed data, the
    16-value code and, per block, an fp32 scale; with double quantization a 1-byte scale per block, then an fp32
    scale per 256 blocks, an fp32 offset and the 256-value fp32 code of those second-level scales."""
    blocks = -(-values // 64)
    scales = blocks + -(-blocks // 256) * 4 + 4 + 256 * 4 if double_quant else blocks * 4
    return -(-values // 2) + 16 * 4 + scales


def activation_parts(shape: Shape, tokens: int, supervised: int, bf16: bool = False,
                     checkpointing: bool = False) -> dict:
    """Bytes of activations at backward's peak for a pass of `tokens` tokens: what the decoder layers keep (all of
    their activations, or with checkpointing only each layer's input), what backward recomputes (one layer's
    activations, checkpointing only) and the logits at the `supervised` positions with their softmax and gradient."""
    act_bytes = 2 if bf16 else 4
    per_layer = (shape.kept[0] * shape.hidden + shape.kept[1] * shape.mlp) * tokens * act_bytes
    kept = shape.layers * tokens * shape.hidden * act_bytes if checkpointing else shape.layers * per_layer
    return {"layers": kept, "recomputed": per_layer if checkpointing else 0, "logits": supervised * shape.vocab * 4 * 3}


def plan_options(train) -> dict:
    """`footprint`'s keyword arguments from a `TrainConfig`: what changes the bytes besides the model and the data."""
    return {"method": train.method, "bf16": train.bf16, "double_quant": train.double_quant,
            "checkpointing": train.gradient_checkpointing}


def pass_size(lengths: list[int], supervised: list[int], batch_size: int, pass_tokens: int, *,
              examples: list | None = None, packing: bool = False, share_prefix: int = 0,
              two_pass: bool = True) -> tuple[int, int]:
    """(tokens, supervised tokens) of the largest forward pass: the `batch_size` longest examples, split into
    passes as training splits them (`split_by_tokens`), each laid out as `collate` lays it out: rows padded to the
    longest, one packed row (`packing`), or, when the `examples` (Encoded) of a pass begin with at least
    `share_prefix` common tokens, that prefix once and each row after it (`two_pass`: the prefix may run as a pass of
    its own; without that, under FSDP and checkpointing, only in one fused row of at most `FUSED_ALONE_MAX` tokens:
    longer, each padded row repeats it)."""
    if not lengths:
        return 0, 0
    longest = _longest(lengths, batch_size)

    def tokens(part: list[int]) -> int:
        if packing:
            return sum(lengths[i] for i in part)
        prefix = shared_prefix_length([examples[i] for i in part]) if examples and share_prefix else 0
        prefix = prefix if prefix >= share_prefix else 0
        shared = prefix + len(part) * (max(lengths[i] for i in part) - prefix)
        return shared if two_pass or shared <= FUSED_ALONE_MAX else len(part) * max(lengths[i] for i in part)

    padded = {tuple(p): tokens(p) for p in split_by_tokens(longest, lengths, pass_tokens)}
    biggest = max(padded, key=padded.get)
    return padded[biggest], sum(supervised[i] for i in biggest)


def passes_per_step(lengths: list[int], batch_size: int, pass_tokens: int, grad_accum: int = 1) -> int:
    """Forward and backward passes in the optimizer step of the longest examples: its micro-batch split as training
    splits it (`split_by_tokens`), times `grad_accum` micro-batches."""
    return len(split_by_tokens(_longest(lengths, batch_size), lengths, pass_tokens)) * grad_accum if lengths else 1


def _longest(lengths: list[int], batch_size: int) -> list[int]:
    """The indices of the `batch_size` longest examples: the micro-batch the plan is made for."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])[-batch_size:]


def generation_bytes(shape: Shape, rows: int, prompt: int, new: int, bf16: bool = False) -> int:
    """Greedy generation of `new` tokens for `rows` prompts of `prompt` tokens (validation by `train.eval_metric`,
    in the training process): every layer's keys and values, one layer's prefill activations (no gradient: they
    go as the next layer comes) and the last position's fp32 logits and their softmax."""
    act = 2 if bf16 else 4
    cache = shape.layers * rows * (prompt + new) * shape.kv * act
    prefill = rows * prompt * (4 * shape.hidden + 3 * shape.mlp) * act
    return cache + prefill + rows * shape.vocab * 4 * 2


def allocator_key(device: str) -> str:
    """`ALLOCATOR`'s key: "cuda", or "cpu-" and the C allocator this process runs under (a plan made by the
    `instructune` command is for a run the same command starts: under the same allocator)."""
    from ..allocator import name

    return "cuda" if device == "cuda" else f"cpu-{name()}"


def allocator_share(device: str) -> float:
    return ALLOCATOR[allocator_key(device)]


# Allocators whose share is of the bytes live at once: tcmalloc and jemalloc hand a freed block to the next request
# of its size, so checkpointing (one layer's activations recomputed at a time) shrinks what they keep (memory_reach,
# e-mails: LoRA + checkpointing planned 19 % over its peak when the share was of the unchecked activations); glibc's
# heap keeps a share of all a pass allocates, checkpointed or not (measured: the same share either way).
LIVE_BYTES = ("cpu-tcmalloc", "cpu-jemalloc")


def footprint(shape: Shape, strategy: str, processes: int, tokens: int, supervised: int, *, method: str = "lora",
              bf16: bool = False, double_quant: bool = True, checkpointing: bool = False,
              evaluation: int = 0, device: str = "cpu", passes: int = 1) -> Footprint:
    """Bytes per process for one strategy (see the module's accounting); `evaluation`: what generation during
    training holds at most (`generation_bytes`), 0 without `train.eval_metric`; `device`: "cpu" or "cuda", whose
    allocators keep different shares (`allocator_share`); `passes`: per optimizer step (`passes_per_step`)."""
    if checkpointing:  # checkpointed layers run as they are (`loop.train` makes them leaner only without)
        shape = replace(shape, kept=PER_TOKEN_LAYER)
    frozen = shape.parameters - shape.trainable - sum(shape.quantized)
    weight_bytes = 2 if (bf16 and method in ("lora", "qlora")) else 4
    weights = (frozen * weight_bytes + shape.trainable * 4
               + sum(four_bit_bytes(n, double_quant) for n in shape.quantized))
    gradients = shape.trainable * 4
    optimizer = shape.trainable * 8
    activations = sum(activation_parts(shape, tokens, supervised, bf16, checkpointing).values())
    activations += max(shape.quantized, default=0) * (2 if bf16 else 4)  # a 4-bit weight dequantized for its matmul
    gathered = loading = 0
    if strategy == "fsdp" and processes > 1:
        loading = -(-max(shape.vocab, shape.mlp) * shape.hidden // processes) * weight_bytes  # one weight's rows
        weights, gradients, optimizer = (-(-x // processes) for x in (weights, gradients, optimizer))
        gathered = (shape.root + 2 * shape.layer) * (2 if bf16 else weight_bytes)
        gathered += max(shape.root, shape.layer) * ((2 if bf16 else 4) + 4) if method == "full" else 0
    else:
        gradients *= 2 if processes > 1 else 1  # DDP's reduction buckets hold a second copy
    if method == "qlora" and device != "cuda":  # the full-precision weights quantized at load stay with the process
        loading = max(loading, sum(shape.quantized) * weight_bytes)
        if bf16 and method == "full":  # autocast keeps a bf16 copy of every fp32 weight it multiplies, for the step
            activations += shape.trainable * 2  # (FSDP gathers each layer in bf16 instead: `gathered`)
    # allocated and freed at every pass: checkpointing keeps less, but recomputes (allocates) as much
    live = checkpointing and allocator_key(device) in LIVE_BYTES
    transient = max(sum(activation_parts(shape, tokens, supervised, bf16, live).values()), gradients, evaluation)
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "gathered": gathered,
             "loading": loading, "activations": activations, "evaluation": evaluation,
             "allocator": int(allocator_share(device) * transient), "runtime": RUNTIME}
    return Footprint(strategy, processes, parts, passes)


# Changes that shrink a run, cheapest first (what each costs besides the memory it saves); `fixes` tries each.
FIXES = (
    ({"gradient_checkpointing": True}, "the same results for about a third more compute"),
    ({"pass_tokens": 256}, "the same results in more, smaller passes"),
    ({"bf16": True}, "bf16 weights and compute: a GPU, or a CPU with AVX512-BF16/AMX"),
    ({"method": "qlora"}, "the frozen base in 4 bits: a little quality, some speed"),
    ({"method": "qlora", "gradient_checkpointing": True}, ""),
    ({"method": "lora"}, "adapters instead of every weight"),
    ({"method": "lora", "gradient_checkpointing": True}, ""),
    ({"method": "qlora", "gradient_checkpointing": True, "bf16": True}, ""),
)


def fixes(plan_for, train, memory: float) -> list[tuple[dict, Footprint]]:
    """The changes of `FIXES` to `train` (a TrainConfig) after which the plan fits in `memory` bytes, cheapest
    first, each with its plan (`plan_for(train) -> Footprint`). A change the config already has and one that
    would not shrink the run (LoRA from QLoRA, a larger `pass_tokens`) are left out."""
    found = []
    for change, _ in FIXES:
        change = {k: v for k, v in change.items() if getattr(train, k) != v}
        if (not change or change.get("method") == "lora" and train.method == "qlora"
                or change.get("pass_tokens", 0) >= (train.pass_tokens or 1 << 62)
                or any(c == change for c, _ in found)):
            continue
        plan = plan_for(train.model_copy(update=change))
        if plan.fits(memory):
            found.append((change, plan))
    return found


def change_text(change: dict) -> str:
    """`train.method: qlora + train.gradient_checkpointing: true`, as a user writes it in the config."""
    return " + ".join(f"train.{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())


def device_memory() -> tuple[int, str]:
    """(bytes, what) one process can use here: the GPU's memory, or this machine's memory."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory (CPU)"


def reset_peak(device) -> None:
    """Start this process's peak-memory count afresh (training after a baseline in the same process): the GPU's
    peak statistics, or Linux's resident high-water mark (`/proc/self/clear_refs`; where that cannot be written,
    the peak stays the process's lifetime one). On the CPU, the memory that the C allocator keeps after the
    baseline freed it (resident, so counted in the mark) is first handed back, or training's peak would be the
    baseline's: 4.07 GB measured against a 2.21 GB plan after e-mail 2-shot evaluation."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)  # glibc; elsewhere not there
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device) -> int:
    """This process's peak memory since `reset_peak`, in bytes: on CUDA the GPU memory it held at most (a GPU used
    by this process alone), else the peak resident set (VmHWM; the lifetime `ru_maxrss` where /proc is not there)."""
    import resource

    import torch

    if device.type == "cuda":  # the allocator's peak, plus what it does not see (the CUDA context, NCCL buffers)
        free, total = torch.cuda.mem_get_info(device)
        outside = max(0, total - free - torch.cuda.memory_reserved(device))
        return torch.cuda.max_memory_reserved(device) + outside
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measured(model, optimizer, device, world: int) -> dict:
    """What each process actually held at the end of training, gathered to every process: the bytes of its
    weights, gradients (trained parameters x their element size) and optimizer state, counted from the tensors
    (FSDP: this process's shards), and its peak memory."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this process

    params = {id(p): p for p in model.parameters()}.values()
    mine = {"weights": sum(local(p).numel() * p.element_size() for p in params) + quant_state_bytes(params),
            "gradients": sum(local(p).numel() * p.element_size() for p in params if p.requires_grad),
            "optimizer": sum(local(v).numel() * v.element_size() for s in optimizer.state.values()
                             for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
            "peak": peak_memory(device)}
    if world == 1:
        return {k: [v] for k, v in mine.items()}
    every = [None] * world
    torch.distributed.all_gather_object(every, mine)
    return {k: [m[k] for m in every] for k in mine}


def quant_state_bytes(params) -> int:
    """The bytes of the quantization constants of 4-bit weights (bitsandbytes' `quant_state`: scales, codes,
    offset; the packed data is the parameter itself), each tensor once."""
    import torch

    seen = {}
    for p in params:
        state = getattr(p, "quant_state", None)
        for owner in (state, getattr(state, "state2", None)):
            for t in vars(owner).values() if owner is not None else ():
                if torch.is_tensor(t):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
