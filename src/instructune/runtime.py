"""Where and how the work runs: the device, the process group, bf16 autocast, CPU attention switches, messages."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from .errors import InstructuneError


def device() -> torch.device:
    """This process's GPU (LOCAL_RANK under a launcher), else the CPU."""
    if torch.cuda.is_available():
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise InstructuneError(f"this is process {local} on this machine, but it has {count} GPU(s): start at most "
                                   f"{count} process(es) per machine (--nproc_per_node / --num_processes), one per GPU",
                                   f"LOCAL_RANK={local}")
        return torch.device("cuda", local)
    return torch.device("cpu")


def check_launcher() -> str | None:
    """The sharding an `accelerate launch` config asks for: "fsdp" for an FSDP config (trained by the same FSDP2
    path as `train.strategy: fsdp`), else None. DeepSpeed is refused: the loop would ignore the sharding asked for."""
    key = "ACCELERATE_USE_DEEPSPEED"
    if os.environ.get(key, "").lower() in ("true", "1"):
        raise InstructuneError("DeepSpeed is not supported: instructune trains with DDP or FSDP (`train.strategy`); "
                               "launch with `accelerate launch --multi_gpu`, an FSDP config, or `torchrun` instead",
                               f"{key}={os.environ[key]}")
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1") else None


def is_main_process() -> bool:
    """Process 0 of a launch (`torchrun`/`accelerate launch` set RANK), or a plain run: the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


def distributed() -> tuple[int, int]:
    """(process index, process count). Under `accelerate launch --multi_gpu` or `torchrun` (which set WORLD_SIZE,
    RANK and the rendezvous address) the process group is created here: NCCL on GPUs, gloo on CPUs. A plain run is
    process 0 of 1."""
    check_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_processes() -> int:
    """How many processes of this launch run on this machine (on a CPU they share its memory)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1))


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bfloat16 natively: a GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (oneDNN's check). Elsewhere torch emulates bf16 matmuls, several times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return True  # cannot tell: do as asked
    return True


def autocast(bf16: bool, device: torch.device):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def grouped_kv_heads(device: torch.device):
    """On a CPU, let torch's attention read grouped key/value heads directly.

    With an attention mask (padding), transformers copies each key/value head once per query head it serves
    (`repeat_kv`) before calling `scaled_dot_product_attention`, because some GPU kernels fall back to slow paths
    with masked grouped-query attention. torch's CPU kernel takes them as they are (`enable_gqa`): the same result,
    with fewer copies to compute, keep for the backward pass and free (SmolLM2-135M trains about 1.2x faster). The
    switch is transformers' own, read at each call, and restored afterwards; GPUs keep transformers' choice."""
    if device.type != "cpu":
        yield
        return
    key, before = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def say(message: str) -> None:
    print(message, flush=True)


WARNED: list[str] = []  # every warning this process has printed (`data lint` counts them)


def warn(message: str) -> None:
    WARNED.append(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)
