"""Leaner backward passes for the two blocks every Llama-style layer repeats, RMSNorm and the SwiGLU MLP: the same
forward (the same operations in the same order, so the same outputs, bit for bit), but backward keeps fewer tensors.

- RMSNorm `w * (x * rsqrt(mean(x²) + eps))`: autograd keeps x, the normalised x and the reciprocal root; here x and
  the root only (the normalised x is recomputed: one multiply);
- SwiGLU `silu(gate) * up`: autograd keeps gate, silu(gate) and up; here gate and up (silu recomputed).

That is 2 of the ~10 hidden-size and 1 of the ~4 MLP-size tensors a layer keeps per token: SmolLM2-135M, fp32,
2-core CPU (`benchmarks/lean_layers.py`): 0.91 -> 0.69 GB of activations for 8 x 83 tokens (full fine-tuning), 2.93
-> 2.49 GB for 8 x 300 (LoRA), at the same speed (SwiGLU's backward is torch's own `silu_backward`: written out in
elementwise steps it was 4 % slower). The gradients are the same up to rounding.

`lean_blocks(model)` swaps these in for training, on modules whose forward is, whitespace aside, the one the
functions here reproduce (transformers' Llama, Mistral, Qwen2, Qwen3, Phi-3 norms, and their MLPs with a SiLU);
anything else keeps its own forward. The memory plan counts the layers it changes (`memory.model_shape`)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re

import torch
import torch.nn.functional as F

# The forwards these functions compute, as transformers 5 writes them (whitespace aside).
RMS_NORM_SOURCE = """def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)"""
MLP_SOURCE = """def forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj"""


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(torch.float32)
            grad_x = (rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad * F.silu(gate) if ctx.needs_input_grad[1] else None


def lean_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def lean_mlp(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def _squashed(source: str) -> str:
    return re.sub(r"\s+", " ", source).strip()


@functools.cache
def _source(cls: type) -> str:
    try:
        return _squashed(inspect.getsource(cls.forward))
    except (OSError, TypeError, AttributeError):
        return ""


_KNOWN = {_squashed(s): f for s, f in ((RMS_NORM_SOURCE, lean_rms_norm), (MLP_SOURCE, lean_mlp))}


def lean_forward(module: torch.nn.Module):
    """The leaner forward for `module`, or None where it has none (another forward; an MLP not gated by a SiLU)."""
    found = _KNOWN.get(_source(type(module)))
    if found is lean_mlp and type(getattr(module, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        return None
    return found


@functools.cache
def _lean_class(cls: type, forward) -> type:
    """`cls` with the leaner forward: same name, a subclass (isinstance holds; transformers' hub-kernel layer, which
    resets a module's own `forward` whenever the model changes mode, keeps the class's)."""
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


@contextlib.contextmanager
def lean_blocks(model, enabled: bool = True):
    """Within the block, the model's RMSNorms and SwiGLU MLPs run the leaner backward (module by module; others as
    they are); afterwards the model is as it was. Yields how many modules it changed. `enabled=False` changes
    nothing: under activation checkpointing (a checkpointed layer keeps nothing inside, so the recomputation would
    only cost: 2 % slower, SmolLM2-135M LoRA on 8 x 300 tokens)."""
    swapped = []
    for module in model.modules() if enabled else ():
        if (found := lean_forward(module)) is not None and "forward" not in vars(module):
            swapped.append((module, type(module)))
            module.__class__ = _lean_class(type(module), found)
    try:
        yield len(swapped)
    finally:
        for module, cls in swapped:
            module.__class__ = cls
