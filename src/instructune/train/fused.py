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
anything else keeps its own forward. The memory plan counts the layers it changes (`memory.model_shape`).

`tied_gradient(model)`: where the output head is the input embeddings (SmolLM2, Qwen2.5 up to 3B, Llama 3.2 1B/3B),
full fine-tuning's backward makes that weight's gradient three times over, the last two at its end: autograd keeps
the head's part (from the first op of backward), makes the lookup's part as a second dense tensor of the whole
vocabulary, and adds the two into a third. Here the rows looked up are summed on their own and added into the head's
part in place: one tensor of the vocabulary's size where autograd makes three (SmolLM2-135M, fp32: 2 x 113 MB fewer
at the end of backward), and the same sums in the same order (bit for bit on this CPU)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from types import SimpleNamespace

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


def _with_forward(cls: type, forward) -> type:
    """`cls` with another forward: same name, a subclass (isinstance holds; names are matched elsewhere; transformers'
    hub-kernel layer, which resets a module's own `forward` whenever the model changes mode, keeps the class's)."""
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


_lean_class = functools.cache(_with_forward)  # one class per layer class: the lean forwards are module-level


@contextlib.contextmanager
def lean_blocks(model, enabled: bool = True):
    """Within the block, the model's RMSNorms and SwiGLU MLPs run the leaner backward (module by module; others as
    they are); afterwards the model is as it was. Yields how many modules it changed. `enabled=False` changes
    nothing: under activation checkpointing (a checkpointed layer keeps nothing inside, so the recomputation would
    only cost: 2 % slower, SmolLM2-135M LoRA on 8 x 300 tokens)."""
    swapped = []
    for module in model.modules() if enabled else ():
        if (found := lean_forward(module)) is not None and "forward" not in vars(module):
            swapped.append((module, type(module), _lean_class(type(module), found)))
            module.__class__ = swapped[-1][2]
    try:
        yield len(swapped)
    finally:
        for module, cls, lean in swapped:
            if type(module) is lean:  # a module sharded since (FSDP's class on top of the lean one) keeps its class
                module.__class__ = cls


class TiedHead(torch.autograd.Function):
    """`hidden @ weight.T`; backward puts the weight's gradient into `pair.grad` (for `TiedLookup` to finish) instead
    of returning it, then calls `after()` (if given)."""
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, pair, after) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.pair, ctx.after = pair, after
        return F.linear(hidden, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        part = grad.reshape(-1, grad.shape[-1]).t() @ hidden.reshape(-1, hidden.shape[-1])
        ctx.pair.grad = part if ctx.pair.grad is None else ctx.pair.grad.add_(part)
        grad_hidden = (grad @ weight) if ctx.needs_input_grad[0] else None
        if ctx.after is not None:  # the weight is read by nothing later in backward (FSDP: free its gathered copy)
            ctx.after()
        return grad_hidden, None, None, None


class TiedLookup(torch.autograd.Function):
    """`weight[ids]`; backward sums the gradients of each row looked up (in token order, from zero, as autograd's
    `embedding_dense_backward` does; the padding row none) and adds those sums into the head's part of the weight's
    gradient (`pair.grad`) in place, row by row: the numbers autograd gives, which makes the lookup's part as a whole
    second tensor of the vocabulary's size and adds the two into a third. Returns the weight's only gradient."""
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, pair, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.pair, ctx.shape, ctx.padding_idx = pair, weight.shape, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        total, ctx.pair.grad = ctx.pair.grad, None
        ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, grad = ids[keep], grad[keep]
        rows, where = torch.unique(ids, return_inverse=True)
        sums = grad.new_zeros(len(rows), grad.shape[-1]).index_add_(0, where, grad)
        if total is None:  # no head in this graph: the lookup's part alone
            total = grad.new_zeros(ctx.shape)
        return None, total.index_add_(0, rows, sums), None, None


def _tied_pair(model):
    """The (input embedding, output head) that share one weight, where both are plain: an nn.Embedding with no
    max_norm, frequency scaling or sparse gradient, and a bias-free nn.Linear. None otherwise (Gemma 3 scales its
    embeddings in its own forward: it keeps it)."""
    try:
        lookup, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    plain = (type(lookup).forward is torch.nn.Embedding.forward and type(head).forward is torch.nn.Linear.forward
             and lookup.max_norm is None and not lookup.scale_grad_by_freq and not lookup.sparse
             and head.bias is None)
    return (lookup, head) if plain and head.weight is lookup.weight else None


@contextlib.contextmanager
def tied_gradient(model, after_head=None):
    """Within the block, a model whose head is its input embeddings, trained (the weight requires a gradient; no
    autocast), builds that weight's gradient in one tensor (`TiedHead`, `TiedLookup`); afterwards it is as it was.
    Yields whether it changed the model. A head pairs with the lookup that ran before it in the same call of `model`
    (whose output is the head's input); a lookup called on its own (a prefix pass through the inner model, embeddings
    computed outside), a call given embeddings, evaluation and LoRA (a frozen weight) run as they are. `after_head()`
    runs once the head's backward has: by default, for a sharded model, `fsdp.release_tied_weights`."""
    from .fsdp import release_tied_weights

    pair = _tied_pair(model)
    if pair is None:
        yield False
        return
    after_head = after_head or release_tied_weights(model)
    lookup, head = pair
    state = SimpleNamespace(pair=None, inside=False)

    def lean(weight) -> bool:
        return torch.is_grad_enabled() and weight.requires_grad and not torch.is_autocast_enabled(weight.device.type)

    def lookup_forward(self, ids):
        state.pair = SimpleNamespace(grad=None) if state.inside and lean(self.weight) else None
        if state.pair is None:
            return torch.nn.Embedding.forward(self, ids)
        return TiedLookup.apply(ids, self.weight, state.pair, self.padding_idx)

    def head_forward(self, hidden):
        found, state.pair = state.pair, None  # one head to one lookup
        if found is None or not lean(self.weight) or self.weight is not lookup.weight:
            return torch.nn.Linear.forward(self, hidden)
        return TiedHead.apply(hidden, self.weight, found, after_head)

    def scope(inside: bool):
        def hook(*_):
            state.inside, state.pair = inside, None
        return hook

    swapped = [(lookup, type(lookup)), (head, type(head))]
    for module, forward in ((lookup, lookup_forward), (head, head_forward)):
        module.__class__ = _with_forward(type(module), forward)  # (closures of this call: not cached)
    hooks = [model.register_forward_pre_hook(scope(True)), model.register_forward_hook(scope(False))]
    try:
        yield True
    finally:
        for h in hooks:
            h.remove()
        for module, cls in swapped:
            module.__class__ = cls
