"""Activation checkpointing (`train.gradient_checkpointing`): per decoder layer, non-reentrant; the same losses and
gradients as without it for LoRA, QLoRA and full fine-tuning on every batch layout training uses (fp32, CPU), and
backward keeps only each layer's input, as the memory plan counts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from instructune.config import ModelConfig, TrainConfig
from instructune.models import checkpoint_layers, hf_config, training_model
from instructune.prompts.format import IGNORE, Encoded
from instructune.train import memory
from instructune.train.collate import collate
from instructune.train.loss import completion_loss_sum

RTOL = 1e-6  # recomputation runs the same kernels on the same inputs: equal but for the order nothing changes


def _examples(seed, shapes=((9, 3), (20, 6), (14, 1), (5, 2)), prefix=12):
    """Random examples sharing their first `prefix` tokens (a system prompt), the last tokens supervised."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, 300, (prefix,), generator=g).tolist()
    out = []
    for n, c in shapes:
        ids = common + torch.randint(3, 300, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * (prefix + n - c) + ids[prefix + n - c:]))
    return out


def _layouts(exs) -> dict[str, list[dict]]:
    """Each layout training uses, as the passes of one step (`pass_tokens` splits a micro-batch into passes)."""
    return {"padded": [collate(exs, 0)], "packed": [collate(exs, 0, packed=True)],
            "fused_prefix": [collate(exs, 0, min_shared=8, fused=True)],
            "passes": [collate(exs[:2], 0), collate(exs[2:], 0)]}


def _loss_and_grads(model, passes):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in passes:
        loss = completion_loss_sum(model, batch)
        loss.backward()  # gradients summed over the passes, as the training step does
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(source, method):
    torch.manual_seed(0)
    return training_model(str(source), ModelConfig(name=str(source)), TrainConfig(method=method)).train()


METHODS = ["lora", "full", pytest.param("qlora", marks=pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes"))]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_checkpointing_gives_the_same_losses_and_gradients(tiny_model, tiny_gemma, family, method):
    model = _model(tiny_model if family == "llama" else tiny_gemma, method)
    layouts = _layouts(_examples(3))  # each compared with itself without checkpointing (Gemma's window included)
    reference = {name: _loss_and_grads(model, passes) for name, passes in layouts.items()}
    checkpoint_layers(model)
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    assert len(layers) == 2  # each decoder layer
    for name, passes in layouts.items():
        loss, grads = _loss_and_grads(model, passes)
        ref_loss, ref_grads = reference[name]
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), name
        assert grads.keys() == ref_grads.keys() and grads, name
        for n, g in grads.items():  # relative to the tensor's largest entry (LoRA's B starts at zero: A's grads are 0)
            assert (g - ref_grads[n]).abs().max() <= RTOL * ref_grads[n].abs().max(), (name, n)


def test_training_model_checkpoints_when_asked_and_only_then(tiny_model):
    cfg = ModelConfig(name=str(tiny_model))
    on = training_model(str(tiny_model), cfg, TrainConfig(gradient_checkpointing=True))
    off = training_model(str(tiny_model), cfg, TrainConfig())
    assert on.get_base_model().is_activation_checkpointing and not off.get_base_model().is_activation_checkpointing
    assert not hasattr(on.get_base_model(), "_require_grads_hook")  # non-reentrant: no input needs a gradient


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpointed_layers_keep_only_their_inputs_as_the_plan_counts(tiny_model, method):
    """The tensors autograd keeps for backward, by where they are made: with checkpointing each decoder layer keeps
    exactly its input (the plan's `layers` part: layers x tokens x hidden, fp32), and nothing outside the layers
    changes; without, the layers keep their activations (the part the plan estimates per token and layer, and
    recomputes one layer at a time with checkpointing)."""
    model = _model(tiny_model, method)
    batch = collate(_examples(3), 0)
    tokens, supervised = batch["input_ids"].numel(), batch["n_supervised"]
    plain = _kept_by_place(model, batch)
    checkpoint_layers(model)
    checkpointed = _kept_by_place(model, batch)
    shape = memory.model_shape(hf_config(str(tiny_model), ModelConfig(name=str(tiny_model))), method,
                               TrainConfig().lora)
    plan = memory.activation_parts(shape, tokens, supervised, checkpointing=True)
    assert sum(v for k, v in checkpointed.items() if k != "outside") == plan["layers"] == 2 * tokens * 32 * 4
    assert checkpointed["outside"] == plain["outside"]
    assert all(plain[i] > 10 * checkpointed[i] for i in (0, 1))
    assert plan["recomputed"] == memory.activation_parts(shape, tokens, supervised)["layers"] // shape.layers


def _kept_by_place(model, batch) -> dict:
    """Bytes of the (non-parameter) tensors saved for backward in one forward pass, by decoder layer index or
    "outside", each storage once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    place, saved, hooks = ["outside"], {}, []
    for i, layer in enumerate(base.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: place.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: place.__setitem__(0, "outside")))

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved.setdefault(storage.data_ptr(), (place[0], storage.nbytes()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = completion_loss_sum(model, batch)
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    out = {}
    for where, n in saved.values():
        out[where] = out.get(where, 0) + n
    return out
