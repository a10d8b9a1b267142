"""bf16 only where the device computes it natively: on a CPU without AVX512-BF16/AMX, evaluation runs in fp32."""

import torch

from conftest import tiny_config
from instructune import tasks
from instructune.config import ExperimentConfig
from instructune.runtime import native_bf16


def _cfg(tmp_path, tiny_model):
    raw = tiny_config(tmp_path, tiny_model, bf16=True)
    raw["evaluate"]["bf16"] = True
    return ExperimentConfig.model_validate(raw)


def test_evaluation_falls_back_to_fp32_without_native_bf16(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(tasks, "native_bf16", lambda device: False)
    cfg = _cfg(tmp_path, tiny_model)
    tasks.prepare(cfg)
    err = capsys.readouterr().err
    assert cfg.evaluate.bf16 is False and "evaluate.bf16" in err and "fp32" in err
    assert cfg.train.bf16 is True and "train.bf16" in err  # training keeps what was asked, with a warning


def test_native_bf16_keeps_the_setting(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(tasks, "native_bf16", lambda device: True)
    cfg = _cfg(tmp_path, tiny_model)
    tasks.prepare(cfg)
    assert cfg.evaluate.bf16 is True and "bf16" not in capsys.readouterr().err


def test_native_bf16_answers_for_this_machine():
    assert isinstance(native_bf16(torch.device("cpu")), bool)
    assert native_bf16(torch.device("meta")) is True


def test_a_process_without_a_gpu_of_its_own_is_refused_by_name(monkeypatch):
    """Two processes launched on a one-GPU machine: the second names the cause instead of a CUDA error."""
    import pytest

    from instructune import runtime
    from instructune.errors import InstructuneError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(InstructuneError, match="1 GPU") as e:
        runtime.device()
    assert e.value.where == "LOCAL_RANK=1"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert runtime.device() == torch.device("cuda", 0)
