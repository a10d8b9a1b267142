"""The training engine: accumulation equals one big batch, and a SIGKILLed run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (BLOCK_AFTER_CHECKPOINT, LOSS_RTOL, WEIGHT_RTOL, loss_gap, processes_with_a_gpu_each, tiny_config,
                      weights_gap, write_config)
from instructune.config import ExperimentConfig
from instructune.models import load_model
from instructune.tasks import prepare
from instructune.train.batching import split_by_tokens
from instructune.train.loop import train


def _setup(tmp_path, tiny_model, **train_cfg):
    cfg = ExperimentConfig.model_validate(tiny_config(tmp_path, tiny_model, ("classification", "qa"), n_train=16,
                                                      method="full", **train_cfg))
    prep = prepare(cfg)
    examples = [t.fmt.encode(p, 256, t.template.max_new_tokens) for t in prep.tasks for p in t.pairs["train"]]
    return cfg, prep, examples


def test_accumulation_4x2_and_split_passes_equal_one_batch_of_8(tmp_path, tiny_model):
    finals = []
    for batch_size, accum, pass_tokens in ((8, 1, 0), (2, 4, 0), (8, 1, 64)):
        cfg, prep, examples = _setup(tmp_path, tiny_model, batch_size=batch_size, grad_accum=accum, epochs=0.5,
                                     max_grad_norm=None, pass_tokens=pass_tokens)
        torch.manual_seed(0)
        model = load_model(prep.model_source, cfg.model)
        log = train(model, examples, [], cfg.train, prep.tokenizer.pad_token_id, cfg.seed)
        finals.append(([e["loss"] for e in log], {n: p.detach().clone() for n, p in model.named_parameters()}))
    lengths = [len(e.input_ids) for e in examples]
    assert 8 * max(lengths) > 64 and len(split_by_tokens(list(range(8)), lengths, 64)) > 1  # 64 did split batches
    (loss_a, w_a), *others = finals
    start = dict(load_model(prep.model_source, cfg.model).named_parameters())
    for loss_b, w_b in others:
        assert len(loss_a) == len(loss_b) == 2
        assert loss_gap(_steps(loss_a), _steps(loss_b)) < LOSS_RTOL
        assert weights_gap(w_a, w_b, start) < WEIGHT_RTOL
    assert any((w_a[n] - p).abs().max() > 0 for n, p in start.items())


def _steps(losses: list[float]) -> list[dict]:
    return [{"step": i, "loss": x} for i, x in enumerate(losses, 1)]


def test_split_by_tokens_keeps_passes_within_the_budget():
    lengths = [10, 50, 12, 48, 11, 200]
    passes = split_by_tokens(list(range(6)), lengths, 100)
    assert sorted(i for p in passes for i in p) == list(range(6))
    assert all(len(p) * max(lengths[i] for i in p) <= 100 or len(p) == 1 for p in passes)
    assert [5] in passes  # longer than the budget: a pass of its own
    assert split_by_tokens([0, 1, 2], lengths, 0) == [[0, 2, 1]]  # 0: one pass (sorted by length)


def _train_cli(config, *extra):
    return [sys.executable, "-m", "instructune.cli", "train", str(config), *extra]


def test_sigkill_and_resume_equals_the_uninterrupted_run(tmp_path, tiny_model):
    common = dict(epochs=2, batch_size=4, save_every=1, lora={"dropout": 0.1})  # dropout: the RNG state must resume too
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    whole = tiny_config(tmp_path / "a", tiny_model, ("classification",), n_train=24, **common)
    subprocess.run(_train_cli(write_config(tmp_path, whole, "whole.yaml")), check=True, env=env, capture_output=True)
    expected = [json.loads(line) for line in open(tmp_path / "a" / "run" / "train_log.jsonl")]
    assert len(expected) == 12

    cut = tiny_config(tmp_path / "b", tiny_model, ("classification",), n_train=24, **common)
    config = write_config(tmp_path, cut, "cut.yaml")
    run = tmp_path / "b" / "run"
    log, marker, wrapper = run / "train_log.jsonl", tmp_path / "checkpoint-5-written", tmp_path / "block.py"
    wrapper.write_text(BLOCK_AFTER_CHECKPOINT)
    with open(tmp_path / "cut.stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, str(wrapper), "5", str(marker), str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        why = (tmp_path / "cut.stderr").read_text()[-2000:]
        assert marker.exists(), f"no checkpoint of step 5 (exit status {proc.poll()}): {why}"
        assert proc.poll() is None  # blocked inside step 5's save_checkpoint, after the save
        assert (run / "checkpoint" / "state.pt").is_file()
        assert json.loads((run / "checkpoint" / "meta.json").read_text())["step"] == 5
        assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model").exists()
    subprocess.run(_train_cli(config, "--resume"), check=True, env=env, capture_output=True)
    resumed = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in resumed] == list(range(1, 13))
    if torch.cuda.is_available():  # CUDA kernels may reduce in another order from run to run
        assert [e["loss"] for e in resumed] == pytest.approx([e["loss"] for e in expected], rel=1e-5)
    else:
        assert [e["loss"] for e in resumed] == [e["loss"] for e in expected]  # bit-identical, step for step
    assert [e.get("val_loss") for e in resumed] == [e.get("val_loss") for e in expected]
    assert not (run / "checkpoint").exists()  # removed once the model is saved
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "run" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "model" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@processes_with_a_gpu_each(2)
def test_two_process_ddp_equals_one_process(tmp_path, tiny_model):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine (gloo): batch 4 per process = one process
    with batch 8. (`accelerate launch --cpu` would want MPI for several processes; torchrun works too.)"""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    losses = []
    for name, batch, launch in (("one", 8, []), ("two", 4, ["-m", "accelerate.commands.launch", "--multi_gpu",
                                                             "--num_processes", "2", "--num_machines", "1",
                                                             "--mixed_precision", "no", "--dynamo_backend", "no"])):
        cfg = tiny_config(tmp_path / name, tiny_model, ("classification", "qa"), n_train=20, method="full",
                          epochs=1, batch_size=batch, eval_every=2)
        config = write_config(tmp_path, cfg, f"{name}.yaml")
        command = [sys.executable, *launch, *(["-m"] if launch else ["-m"]), "instructune.cli", "train", str(config)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        losses.append([json.loads(line) for line in open(tmp_path / name / "run" / "train_log.jsonl")])
    one, two = losses
    assert [e["step"] for e in one] == [e["step"] for e in two] == [1, 2, 3, 4, 5]
    assert loss_gap(one, two) < LOSS_RTOL and loss_gap(one, two, "val_loss") < LOSS_RTOL
    assert [e["tokens"] for e in one] == [e["tokens"] for e in two]


def test_tensorboard_gets_the_logged_scalars(tmp_path, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, prep, examples = _setup(tmp_path, tiny_model, batch_size=8, epochs=1, eval_every=2)
    model = load_model(prep.model_source, cfg.model)
    log = train(model, examples, examples[:4], cfg.train, prep.tokenizer.pad_token_id, 0,
                tensorboard_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == [float(torch.tensor(e["loss"], dtype=torch.float32)) for e in log]
    assert len(events.Scalars("train/val_loss")) == sum("val_loss" in e for e in log) >= 2


def test_metric_validation_early_stopping_and_best_weights(tmp_path, tiny_model):
    from instructune.evaluate.score import validation_scorer

    cfg, prep, examples = _setup(tmp_path, tiny_model, batch_size=8, epochs=8, eval_every=1, eval_metric=True,
                                 metric_samples=4, early_stopping_patience=2, keep_best=True, lr=1e-2)
    scorer = validation_scorer([(t.template, t.fmt, t.pairs["validation"][: cfg.train.metric_samples]) for t in prep.tasks],
                               cfg.evaluate.batch_size, cfg.train.bf16)
    scores, snapshots = [], []

    def score(m):  # the real scorer; the weights seen at each validation are kept to check which ones survive
        snapshots.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        scores.append(scorer(m))
        return scores[-1]

    torch.manual_seed(0)
    model = load_model(prep.model_source, cfg.model)
    log = train(model, examples, examples[:4], cfg.train, prep.tokenizer.pad_token_id, 0, score_fn=score)
    assert [e["val_metric"] for e in log] == scores and all(0 <= s <= 1 for s in scores)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of the best
    assert log[-1].get("early_stop") and len(log) == best + 1 + 2 < 32  # stopped 2 validations after the best
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[best][k]) for k in final)
    assert best == len(log) - 1 or not all(torch.equal(final[k], snapshots[-1][k]) for k in final)


def test_bf16_lora_keeps_frozen_weights_bf16_and_the_adapter_fp32(tmp_path, tiny_model):
    from safetensors.torch import load_file

    from conftest import processes_with_a_gpu_each, tiny_config, write_config
    from instructune.models import training_model

    cfg = ExperimentConfig.model_validate(tiny_config(tmp_path, tiny_model, ("classification",), n_train=16,
                                                      method="lora", batch_size=4, epochs=2, bf16=True, lr=1e-2))
    prep = prepare(cfg)
    examples = [prep.tasks[0].fmt.encode(p, 256, 8) for p in prep.tasks[0].pairs["train"]]
    model = training_model(prep.model_source, cfg.model, cfg.train)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    log = train(model, examples, examples[:4], cfg.train, prep.tokenizer.pad_token_id, cfg.seed)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log) and log[-1]["loss"] < log[0]["loss"]
    # the whole pipeline with it: the saved adapter is fp32 and evaluates
    raw = tiny_config(tmp_path / "run2", tiny_model, ("classification",), n_train=16, bf16=True, eval_metric=True)
    result = subprocess.run([sys.executable, "-m", "instructune.cli", "run", str(write_config(tmp_path, raw, "bf16.yaml"))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(str(tmp_path / "run2" / "run" / "model" / "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
