"""Shared fixtures: tiny randomly initialised causal LMs with a tokenizer built locally, and tiny task data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "The delivery of my order is late and the parcel never arrived.",
    "I was charged twice on my invoice, please refund the payment.",
    "The app crashes when I log in to my account.",
    "Summarize the following text. The database server restarted at noon after a disk failure.",
    "Translate this sentence to French: the cat eats the fish. Le chat mange le poisson.",
    "Read the following passage and answer the question. Maria founded Bluefin Labs in Lisbon in 1998.",
    "Identify and classify the entities: Barack Obama was born in Hawaii. person organization location none",
    "positive negative billing delivery technical account Category Answer Entities Summary Question Passage",
] * 4


def processes_with_a_gpu_each(n: int):
    """Skip where the processes would not each have a device: a machine with 1..n-1 GPUs (CPU-only machines run
    n gloo processes)."""
    import torch

    return pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < n,
                              reason=f"{n} processes need {n} GPUs on a GPU machine")


def build_tiny_model(path: Path, chat: bool = True, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token="<|endoftext|>" if not chat else None)
    if chat:
        tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def build_tiny_t5(path: Path, seed: int = 0) -> Path:
    """A tiny random T5 (encoder-decoder) with the same locally trained tokenizer, no chat template."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    build_tiny_model(path, chat=False, seed=seed)  # writes the tokenizer (and a Llama we replace)
    tok = AutoTokenizer.from_pretrained(path)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (path / name).unlink(missing_ok=True)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_gemma(path: Path, seed: int = 0) -> Path:
    """A tiny random Gemma 3 (text) with the chat tokenizer: the other causal family we ship a preset for, with a
    sliding-window layer (window 8) next to a full-attention one."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    build_tiny_model(path, chat=True, seed=seed)
    tok = AutoTokenizer.from_pretrained(path)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (path / name).unlink(missing_ok=True)
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                           max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id)
    Gemma3ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat"), chat=True)


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plain"), chat=False)


TASK_RECORDS = {
    "classification": lambda i: {"text": f"Message number {i}: " + ["I was charged twice", "my parcel is late",
                                                                     "the app crashes", "reset my password"][i % 4],
                                 "label": ["billing", "delivery", "technical", "account"][i % 4]},
    "summarization": lambda i: {"text": f"Server {i} restarted at noon after a disk failure. Users saw errors for {i} minutes.",
                                "summary": f"Server {i} restarted after a disk failure."},
    "translation": lambda i: {"text": f"The cat eats {i} fish.", "translation": f"Le chat mange {i} poissons."},
    "qa": lambda i: {"context": f"Maria founded Bluefin Labs in {1900 + i}.", "question": "When was Bluefin Labs founded?",
                     "answer": str(1900 + i)},
    "ner": lambda i: {"text": f"Maria {i} visited Lisbon for Bluefin Labs.",
                      "entities": [{"text": f"Maria {i}", "type": "person"}, {"text": "Lisbon", "type": "location"},
                                   {"text": "Bluefin Labs", "type": "organization"}]},
}


def write_jsonl(path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, model: Path, task_types=("classification",), n_train=12, **train) -> dict:
    """A config dict for a tiny run over hand-made records of the given task types."""
    tasks = []
    for t in task_types:
        rows = [TASK_RECORDS[t](i) for i in range(n_train + 10)]
        base = tmp_path / "data" / t
        tasks.append({"name": f"tiny_{t}", "type": t, "data": {
            "train": str(write_jsonl(base / "train.jsonl", rows[:n_train])),
            "validation": str(write_jsonl(base / "validation.jsonl", rows[n_train:n_train + 4])),
            "test": str(write_jsonl(base / "test.jsonl", rows[n_train + 4:]))}, "max_new_tokens": 8})
    return {"name": "tiny", "output_dir": str(tmp_path / "run"), "model": {"name": str(model)}, "tasks": tasks,
            "baseline": {"k": 2}, "train": {"epochs": 1, "batch_size": 4, "max_length": 256, **train},
            "evaluate": {"batch_size": 8, "max_new_tokens": 8}}


def write_config(tmp_path: Path, cfg: dict, name: str = "config.yaml") -> Path:
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # No test may reach a hub; converted models go to a per-test cache unless a test says otherwise.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    if "INSTRUCTUNE_CACHE" not in os.environ:
        monkeypatch.setenv("INSTRUCTUNE_CACHE", str(tmp_path / "cache"))


# -- comparing two computations of the same training -------------------------------------------------------------
# The runs these tests compare differ only in the order of fp32 sums: how a batch is split over processes, passes or
# accumulation steps, the thread count, and the matrix kernels, whose blocking depends on the CPU's vector width
# (AVX2, AVX-512, AMX) or on CUDA. Each op then agrees to fp32 rounding (~1e-7 relative, times the square root of
# the terms summed), and AdamW's per-coordinate normalisation (g / sqrt(v)) magnifies that for coordinates whose
# gradient is small. So they are compared relative to the magnitudes involved, never in absolute units that hold on
# one CPU only: a loss to LOSS_RTOL of its value; a gradient to GRAD_RTOL of the tensor's largest entry; weights
# by how far training moved them (max |a - b| <= WEIGHT_RTOL * max |a - start|, over the whole model). Measured on
# an AVX2 CPU with the default kernels and with others forced (ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE):
# at most 1.2e-7 of a loss, 2.7e-6 of a gradient, 2.2e-4 of the weights' movement. A real fault (a lost share of the gradient, a wrong reduction, a
# token attending across examples) moves a loss by 1e-3 or more of its value and weights by a large part of their
# movement: the tests that break the code on purpose show it.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
WEIGHT_RTOL = 1e-3


def loss_gap(a: list[dict], b: list[dict], key: str = "loss") -> float:
    """The largest relative difference of `key` between two training logs of the same steps."""
    assert [e["step"] for e in a] == [e["step"] for e in b]
    return max(abs(x[key] - y[key]) / max(abs(x[key]), abs(y[key]), 1e-12) for x, y in zip(a, b) if key in x)


def grads_gap(a: dict, b: dict) -> float:
    """The largest difference between two sets of gradients, per tensor, relative to the tensor's largest entry."""
    assert a.keys() == b.keys() and a
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item() for n in a)


def weights_gap(a: dict, b: dict, start: dict) -> float:
    """How far apart two trainings of the same weights ended (the largest difference of any weight), relative to how
    far training moved them (the largest move of any weight). The whole model's move is the scale: AdamW moves every
    coordinate by about the learning rate per step whatever its gradient's size, and the rounding differences it
    magnifies are of that size too, also in a tensor that itself barely moved (its gradient changing sign)."""
    assert a.keys() == b.keys() and a
    moved = max((a[n] - start[n]).abs().max().item() for n in a)
    gap = max((a[n] - b[n]).abs().max().item() for n in a)
    assert moved > 0, "training moved no weight: nothing to compare"
    return gap / moved


# Runs the real CLI with save_checkpoint patched: once the checkpoint of step STOP is written whole, it drops a marker
# and blocks, so the test kills a run that is certainly mid-training, however fast the machine.
BLOCK_AFTER_CHECKPOINT = """
import sys, time
from pathlib import Path

import instructune.train.checkpoint as checkpoint

STOP, marker, config = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
real_save = checkpoint.save_checkpoint


def save_then_block(folder, named, optimizer, scheduler, state, *args, **kwargs):
    real_save(folder, named, optimizer, scheduler, state, *args, **kwargs)
    if state["step"] == STOP:
        marker.write_text(str(STOP))
        time.sleep(3600)


checkpoint.save_checkpoint = save_then_block
from instructune.cli import main

sys.argv = ["instructune", "train", config]
main()
"""
