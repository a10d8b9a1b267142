"""The leaner RMSNorm and SwiGLU backward (`train/fused.py`): the same outputs bit for bit, the same gradients up to
rounding, the tensors kept for backward fewer by exactly what the memory plan counts, and only where the module's
forward is the one reproduced."""

import dataclasses

import pytest
import torch
from transformers import (Gemma3TextConfig, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from conftest import GRAD_RTOL, grads_gap
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from instructune.train import memory
from instructune.train.fused import lean_blocks, lean_forward, lean_mlp, lean_rms_norm

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig(**COMMON)),
    "mistral": (MistralForCausalLM, MistralConfig(**COMMON, head_dim=12)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=12)),
    "phi3": (Phi3ForCausalLM, Phi3Config(**COMMON, pad_token_id=0)),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(**COMMON, head_dim=12)),
}


def _model(arch: str):
    torch.manual_seed(0)
    cls, config = ARCHS[arch]
    config._attn_implementation = "sdpa"
    model = cls(config).train()
    with torch.no_grad():  # norms away from 1, so their gradients are not trivial
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"])
def test_same_outputs_bit_for_bit_and_the_same_gradients(arch):
    model = _model(arch)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    logits, grads = _step(model, ids)
    classes = [type(m) for m in model.modules()]
    with lean_blocks(model) as swapped:
        lean_logits, lean_grads = _step(model, ids)
    # Llama, Mistral, Qwen2: 2 norms a layer + the final one, and each MLP; Qwen3 its q/k norms too; Phi-3 its norms
    # (its MLP multiplies a fused gate_up projection); Gemma 3 none (its norms scale by 1 + w)
    assert swapped == {"llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 11, "phi3": 5, "gemma3": 0}[arch]
    assert torch.equal(lean_logits, logits)
    assert lean_grads.keys() == grads.keys() and grads_gap(lean_grads, grads) < GRAD_RTOL
    assert [type(m) for m in model.modules()] == classes  # as it was afterwards


def test_the_tensors_kept_for_backward_shrink_by_what_the_plan_counts():
    """Two hidden-size tensors (the normalised inputs of a layer's two norms) and one MLP-size tensor (silu(gate))
    fewer per token and layer, which is `memory.Shape.kept` from the model's config."""
    model = _model("llama")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))

    def kept_bytes() -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids).logits.sum().backward()
        return sum(seen.values())

    plain = kept_bytes()
    with lean_blocks(model):
        lean = kept_bytes()
    config = ARCHS["llama"][1]
    tokens, layers = ids.numel(), config.num_hidden_layers
    final_norm = tokens * config.hidden_size * 4  # the last norm keeps one hidden-size tensor fewer too
    assert plain - lean == layers * tokens * (2 * config.hidden_size + config.intermediate_size) * 4 + final_norm
    assert memory.model_shape(config, "full").kept == (8, 3)
    assert memory.model_shape(ARCHS["phi3"][1], "full").kept == (8, 4)
    assert memory.model_shape(ARCHS["gemma3"][1], "full").kept == memory.PER_TOKEN_LAYER
    # checkpointed layers run as they are (nothing inside them is kept): their recomputed layer counted in full
    shape = memory.model_shape(config, "full")
    plain = dataclasses.replace(shape, kept=memory.PER_TOKEN_LAYER)
    kw = dict(tokens=64, supervised=8, method="full")
    assert (memory.footprint(shape, "ddp", 1, checkpointing=True, **kw).parts
            == memory.footprint(plain, "ddp", 1, checkpointing=True, **kw).parts)
    assert (memory.footprint(shape, "ddp", 1, **kw).parts["activations"]
            < memory.footprint(plain, "ddp", 1, **kw).parts["activations"])


def test_only_the_forwards_reproduced_are_swapped():
    model = _model("llama")
    norm, mlp = model.model.layers[0].input_layernorm, model.model.layers[0].mlp
    assert lean_forward(norm) is lean_rms_norm and lean_forward(mlp) is lean_mlp
    mlp.act_fn = torch.nn.GELU()  # another activation: the SwiGLU function does not apply
    assert lean_forward(mlp) is None

    class Other(torch.nn.Module):
        def forward(self, x):
            return x * 2

    assert lean_forward(Other()) is None and lean_forward(model.model.layers[0]) is None
    norm.forward = lambda x: x  # a forward set on the module by someone else is left alone
    with lean_blocks(model):
        assert norm.forward(torch.ones(1)) == 1 and type(norm) is LlamaRMSNorm


def test_a_mode_change_inside_keeps_the_lean_forward_and_leaving_restores_the_classes():
    """transformers' hub-kernel layers reset a module's own `forward` at `model.train()`/`eval()` (the validation
    in training switches modes): the leaner forward is the class's, so it stays."""
    model = _model("llama")
    norm = model.model.layers[0].input_layernorm
    with lean_blocks(model):
        model.eval()
        model.train()
        assert type(norm).forward is lean_rms_norm and isinstance(norm, LlamaRMSNorm)
        assert type(norm).__name__ == "LlamaRMSNorm"  # names matched elsewhere (`_no_split_modules`) still match
    assert type(norm) is LlamaRMSNorm and type(model.model.layers[0].mlp) is LlamaMLP


def _tied(arch: str):
    cls, config = ARCHS[arch]
    config = dataclasses.replace(config) if dataclasses.is_dataclass(config) else config.__class__(**config.to_dict())
    config.tie_word_embeddings = True
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(config).train()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def _vocab_tensors_in_backward(model, ids) -> int:
    """How many tensors of the embeddings' size backward allocates (not views, not results written in place)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    size = model.get_input_embeddings().weight.numel()
    made = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                     if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.numel() == size and out.untyped_storage().data_ptr() not in given:
                made.append(func.__name__)
            return out

    loss = model(input_ids=ids).logits.sum()
    with Count():
        loss.backward()
    return len(made)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_tied_embeddings_one_gradient_tensor_the_same_gradients(arch):
    """The head and the lookup of one weight: the same logits bit for bit, the same gradients up to rounding (Phi-3:
    a padding row, which the lookup leaves without gradient as nn.Embedding does), and one whole-vocabulary tensor
    made in backward where autograd makes three."""
    from instructune.train.fused import tied_gradient

    model = _tied(arch)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = 0  # Phi-3's padding id: its row gets the head's gradient only
    logits, grads = _step(model, ids)
    classes = [type(m) for m in model.modules()]
    with tied_gradient(model) as changed:
        assert changed
        tied_logits, tied_grads = _step(model, ids)
        assert _vocab_tensors_in_backward(model, ids) == 1
    assert _vocab_tensors_in_backward(model, ids) == 3  # autograd's: the head's part, the lookup's, their sum
    assert torch.equal(tied_logits, logits)
    assert tied_grads.keys() == grads.keys() and grads_gap(tied_grads, grads) < GRAD_RTOL
    assert [type(m) for m in model.modules()] == classes


def test_tied_gradient_a_head_without_its_lookup_and_two_lookups_in_one_graph():
    """A prefix pass through the inner model (a lookup, no head), embeddings computed outside the model (a lookup whose
    output is detached, then a head given embeddings) and a pass given undetached embeddings, beside the rows' pass:
    the gradients autograd gives."""
    from instructune.train.fused import tied_gradient

    model = _tied("llama")
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))

    def passes():
        model.zero_grad(set_to_none=True)
        prefix = model.model(input_ids=ids[:, :3]).last_hidden_state.sum()  # a lookup, no head
        embedded = model(inputs_embeds=model.get_input_embeddings()(ids[:, 3:]).detach()).logits.sum()  # no lookup
        given = model(inputs_embeds=model.get_input_embeddings()(ids[:, 2:])).logits.mean()
        rows = model(input_ids=ids).logits.pow(2).mean()
        (prefix + embedded + given + rows).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = passes()
    with tied_gradient(model):
        tied = passes()
    assert grads_gap(tied, plain) < GRAD_RTOL


def test_tied_gradient_leaves_alone_what_it_does_not_reproduce():
    """Untied weights, Gemma 3's scaled embeddings, a frozen weight (LoRA) and evaluation run as they are."""
    from instructune.train.fused import TiedHead, tied_gradient

    with tied_gradient(_model("llama")) as changed:  # untied
        assert not changed
    gemma = _tied("gemma3")
    with tied_gradient(gemma) as changed:
        assert not changed
    model = _tied("llama")
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    with tied_gradient(model):
        with torch.no_grad():
            assert model(input_ids=ids).logits.grad_fn is None
        model.get_input_embeddings().weight.requires_grad_(False)
        out = model(input_ids=ids).logits
        assert type(out.grad_fn).__name__ != TiedHead.__name__ + "Backward"
        model.get_input_embeddings().weight.requires_grad_(True)
        assert model(input_ids=ids).logits.grad_fn.name() == "TiedHeadBackward"


def test_a_module_wrapped_inside_the_block_keeps_its_wrapper():
    """A norm sharded while the lean forward is in (FSDP puts its class on top of the module's): leaving the block
    does not take FSDP's class away; the others get their own back. Outside FSDP nothing is freed early."""
    from instructune.train.fsdp import release_tied_weights

    model = _model("llama")
    norm, mlp = model.model.norm, model.model.layers[0].mlp
    with lean_blocks(model):
        wrapped = type("FSDPLlamaRMSNorm", (type(norm),), {})
        norm.__class__ = wrapped
    assert type(norm) is wrapped and type(mlp) is LlamaMLP
    assert release_tied_weights(_tied("llama")) is None
