"""The memory plan (`instructune plan`, `train/memory.py`): its counts equal the real model's, its state figures
equal the bytes training actually holds, and the command refuses bad options with exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config, write_config
from instructune.config import ExperimentConfig
from instructune.experiment import memory_plan
from instructune.models import hf_config, training_model
from instructune.tasks import prepare
from instructune.train import memory
from instructune.train.loop import train


def _prep(tmp_path, tiny_model, **train_cfg):
    cfg = ExperimentConfig.model_validate(tiny_config(tmp_path, tiny_model, ("classification", "qa"), n_train=16,
                                                      **train_cfg))
    prep = prepare(cfg)
    return cfg, prep, [e for t in prep.tasks for e in t.encoded("train", cfg.train.max_length)]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_counts_from_the_meta_device_equal_the_loaded_model(tmp_path, tiny_model, method):
    cfg, prep, _ = _prep(tmp_path, tiny_model, method=method)
    shape = memory.model_shape(hf_config(prep.model_source, cfg.model), method, cfg.train.lora)
    model = training_model(prep.model_source, cfg.model, cfg.train)
    unique = {id(p): p for p in model.parameters()}.values()  # tied embeddings once
    assert shape.parameters == sum(p.numel() for p in unique)
    assert shape.trainable == sum(p.numel() for p in unique if p.requires_grad)
    assert shape.layers == 2 and shape.hidden == 32 and shape.mlp == 64
    layer = (model.get_base_model() if method == "lora" else model).model.layers[0]
    assert shape.layer == sum(p.numel() for p in layer.parameters())
    assert shape.root == shape.parameters - 2 * shape.layer


@pytest.mark.parametrize("method", ["full", "lora"])
def test_planned_state_equals_the_bytes_training_holds(tmp_path, tiny_model, method):
    """Weights, gradients and optimizer state as planned, to the byte, against the tensors after training."""
    cfg, prep, examples = _prep(tmp_path, tiny_model, method=method, epochs=0.25)
    plan = memory_plan(prep, examples)("ddp", 1)
    torch.manual_seed(0)
    model = training_model(prep.model_source, cfg.model, cfg.train)
    measured = {}
    train(model, examples, [], cfg.train, prep.tokenizer.pad_token_id, cfg.seed, measured=measured)
    for part in ("weights", "gradients", "optimizer"):
        assert measured[part] == [plan.parts[part]], part
    assert measured["peak"][0] > plan.parts["weights"]


def test_sharding_divides_the_state_and_ddp_doubles_the_gradients():
    shape = memory.Shape(parameters=1000, trainable=1000, root=200, layer=400, layers=2, hidden=8, mlp=16, vocab=50)
    one = memory.footprint(shape, "ddp", 1, 64, 8, method="full")
    ddp = memory.footprint(shape, "ddp", 2, 64, 8, method="full")
    fsdp = memory.footprint(shape, "fsdp", 4, 64, 8, method="full")
    assert one.parts["weights"] == 4000 and one.parts["gradients"] == 4000 and one.parts["optimizer"] == 8000
    assert ddp.parts["gradients"] == 8000 and ddp.parts["weights"] == 4000  # the reduction buckets
    assert fsdp.parts["weights"] == 1000 and fsdp.parts["optimizer"] == 2000 and fsdp.parts["gradients"] == 1000
    assert fsdp.parts["gathered"] == (200 + 2 * 400) * 4 + 400 * 8  # root + two layers in flight; the largest unit's
    big_root = memory.Shape(parameters=1000, trainable=1000, root=600, layer=200, layers=2, hidden=8, mlp=16, vocab=50)
    assert memory.footprint(big_root, "fsdp", 4, 64, 8, method="full").parts["gathered"] == (600 + 2 * 200) * 4 + 600 * 8
    assert memory.footprint(big_root, "fsdp", 4, 64, 8, method="full", bf16=True).parts["gathered"] == \
        (600 + 2 * 200) * 2 + 600 * 6  # the gradient whole in bf16, reduce-scattered from fp32
    assert memory.footprint(big_root, "fsdp", 4, 64, 8).parts["gathered"] == (600 + 2 * 200) * 4  # LoRA: none
    assert fsdp.parts["loading"] == 50 * 8 // 4 * 4 and ddp.parts["loading"] == 0  # its rows of the embeddings
    assert fsdp.state / ddp.state < 0.6
    lora_bf16 = memory.footprint(memory.Shape(1000, 10, 200, 400, 2, 8, 16, 50), "ddp", 1, 64, 8, bf16=True)
    assert lora_bf16.parts["weights"] == 990 * 2 + 10 * 4  # frozen in bf16, the adapter in fp32
    assert memory.footprint(shape, "ddp", 1, 128, 8).parts["activations"] > one.parts["activations"]


def test_the_largest_pass_follows_pass_tokens():
    lengths, supervised = [10, 50, 100, 20], [2, 5, 9, 3]
    assert memory.pass_size(lengths, supervised, batch_size=4, pass_tokens=0) == (400, 19)
    assert memory.pass_size(lengths, supervised, batch_size=4, pass_tokens=250) == (200, 14)
    assert memory.pass_size(lengths, supervised, batch_size=4, pass_tokens=50) == (100, 9)  # one row at least
    assert memory.pass_size([], [], 4, 0) == (0, 0)


def test_the_largest_pass_counts_a_shared_prefix_once_only_where_training_does():
    """With a prefix pass (DDP, one process) the prefix is counted once; without (FSDP, checkpointing) only in a
    fused row of at most FUSED_ALONE_MAX tokens (`collate`), longer rows each repeat it."""
    from instructune.prompts.format import IGNORE, Encoded

    prefix = list(range(3, 103))
    for own, shared_tokens in ((60, 100 + 4 * 60), (120, 100 + 4 * 120)):
        examples = [Encoded(prefix + [200 + i] * own, [IGNORE] * (100 + own - 2) + [7, 8]) for i in range(4)]
        lengths, supervised = [len(e.input_ids) for e in examples], [2] * 4
        kw = dict(examples=examples, share_prefix=16)
        assert memory.pass_size(lengths, supervised, 4, 0, **kw) == (shared_tokens, 8)
        alone = memory.pass_size(lengths, supervised, 4, 0, two_pass=False, **kw)
        assert alone == ((shared_tokens, 8) if shared_tokens <= 512 else (4 * (100 + own), 8))


def test_a_step_of_several_passes_holds_the_gradients_beside_the_next_passs_activations():
    """Measured (benchmarks/memory_scaling.py, full fine-tuning, a batch of 16 split into 2 passes): the first
    step peaked at weights + gradients + optimizer + runtime, the next ones 0.9-1.4 GB higher, the gradients the
    first pass filled living beside the second pass's activations. One pass: backward frees the one as it fills
    the other."""
    lengths = [10, 50, 100, 20]
    assert memory.passes_per_step(lengths, batch_size=4, pass_tokens=0) == 1
    assert memory.passes_per_step(lengths, batch_size=4, pass_tokens=250) == 2
    assert memory.passes_per_step(lengths, batch_size=4, pass_tokens=250, grad_accum=3) == 6
    assert memory.passes_per_step([], batch_size=4, pass_tokens=250) == 1
    shape = memory.Shape(parameters=1000, trainable=1000, root=200, layer=400, layers=2, hidden=8, mlp=16, vocab=50)
    one, two = (memory.footprint(shape, "ddp", 1, 64, 8, method="full", passes=n) for n in (1, 2))
    base = sum(one.parts[k] for k in ("weights", "optimizer", "gathered", "loading", "runtime", "allocator"))
    act, grads = one.parts["activations"], one.parts["gradients"]
    assert one.parts == two.parts and one.peak == base + max(act, grads) and two.peak == base + act + grads


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "instructune.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_plan_command_prints_both_strategies_and_refuses_bad_options(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, method="full"))
    done = _cli("plan", str(config), "--processes", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = {l.split("│")[1].strip(): l for l in done.stdout.splitlines() if l.count("│") > 5}
    assert set(lines) >= {"ddp", "fsdp"}
    assert not (tmp_path / "run").exists()  # planning writes nothing
    tight = _cli("plan", str(config), "--processes", "1", "--device-memory", "0.001", cwd=tmp_path)
    assert tight.returncode == 0 and "does not fit" in tight.stdout
    for bad in (["--strategy", "zero3"], ["--processes", "0"], ["--device-memory", "-1"], ["--processes", "two"]):
        done = _cli("plan", str(config), *bad, cwd=tmp_path)
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
    missing = _cli("plan", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr + missing.stdout


def test_train_records_the_plan_and_the_measured_peak(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model, epochs=0.25))
    done = _cli("train", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "memory plan: ddp x 1: ~" in out and "peak memory per process:" in out
    mem = json.loads((tmp_path / "run" / "model" / "instructune.json").read_text())["memory"]
    assert mem["strategy"] == "ddp" and mem["planned_peak"] > 0 and len(mem["peak"]) == 1
    assert mem["weights"][0] == mem["planned"]["weights"]
    # the command trains under the allocator it finds (tcmalloc after `make setup`), and plans for that one
    from instructune.allocator import chosen

    assert mem["host_allocator"] == chosen() and f"host allocator {chosen()}" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident high-water mark is Linux's")
def test_the_peak_count_restarts_without_what_the_allocator_kept_from_the_baseline():
    """Memory the baseline freed but the C allocator kept (resident) must not count as training's peak: 300 MB of
    blocks freed under a live one stay resident, and the count restarted by reset_peak is below them."""
    script = """
import torch
from instructune.train import memory
blocks = [bytearray(100_000) for _ in range(3000)]  # below glibc's mmap threshold: they live in the heap
pin = bytearray(100_000)  # keeps the heap's top in use, so freeing the blocks returns nothing by itself
del blocks
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
memory.reset_peak(torch.device("cpu"))
print(rss, memory.peak_memory(torch.device("cpu")))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rss, peak = map(int, out.stdout.split())
    assert rss - peak > 200e6, (rss, peak)


LLAMA_3_1_8B = {  # meta-llama/Llama-3.1-8B's config.json (its shape; no weights are read)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}


def test_an_8b_lora_on_24_gb_is_refused_with_the_cheapest_changes_that_fit(tmp_path, tiny_model):
    """Llama-3.1-8B (its config.json and any tokenizer, no weights) on the e-mail data (long prompts) in passes of
    2,048 tokens (a GPU's setting; at the default 1,024 the leaner norms and MLP, `train/fused.py`, make it fit), LoRA
    bf16 on 24 GB: does not fit; the advice lists what does, cheapest first, QLoRA + checkpointing among them; `train`
    refuses before writing anything (exit 2, the same advice) unless --force."""
    import shutil

    from instructune.config import load_config
    from instructune.experiment import check_fits, fit_advice

    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    for f in tiny_model.glob("*"):
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, folder / f.name)
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "email-subjects.yaml",
                      [f"model.name={folder}", "train.bf16=true", "train.pass_tokens=2048",
                       f"output_dir={tmp_path / 'run'}"])
    prep = prepare(cfg, weights=False)
    train_set = [e for t in prep.tasks for e in t.encoded("train", cfg.train.max_length)]
    advice = fit_advice(prep, train_set, "ddp", 1, 24 * memory.GB, gpu=True)
    assert advice and "train.method: lora needs" in advice
    fixes = advice.split("cheapest first: ")[1].split("; ")
    names = [f.split(" → ")[0] for f in fixes]
    assert names[0] == "train.gradient_checkpointing: true"
    assert "train.method: qlora + train.gradient_checkpointing: true" in names
    peaks = {n: float(f.split(" → ")[1].split()[0]) for n, f in zip(names, fixes)}
    assert all(p <= 0.9 * 24 for p in peaks.values())
    assert peaks["train.method: qlora + train.gradient_checkpointing: true"] < peaks["train.method: qlora"]
    with pytest.raises(Exception) as refused:
        check_fits(prep, 24)
    assert "does not fit" in str(refused.value) and "--force" in str(refused.value)
    check_fits(prep, 80)  # fits on 80 GB
    check_fits(prep, 24, force=True)  # trains anyway, with a warning
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_run_the_plan_says_cannot_fit_before_anything_is_written(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model))
    done = _cli("train", str(config), "--device-memory", "0.01", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    message = [l for l in done.stderr.splitlines() if l.strip()]
    assert len(message) == 1 and "does not fit" in message[0] and "--force" in message[0], done.stderr
    assert "--device-memory" in message[0]
    assert not (tmp_path / "run").exists()
