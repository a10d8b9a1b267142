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


def _cpu_flags() -> set[str]:
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        import pytest

        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    return {f for line in info.read_text().splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_native_bf16_answers_for_this_machine():
    """What the CPU's flags settle: bf16 instructions (AVX512-BF16, AMX) mean native; a CPU with neither AVX-512 nor
    AVX-NE-CONVERT (AVX2 only, as the AMD EPYC machines here) emulates bf16, several times slower than fp32."""
    flags = _cpu_flags()
    if {"amx_bf16", "avx512_bf16"} & flags:
        assert native_bf16(torch.device("cpu")) is True
    elif not {"avx512f", "avx_ne_convert"} & flags:
        assert native_bf16(torch.device("cpu")) is False
    assert native_bf16(torch.device("meta")) is True


def test_native_bf16_follows_onednn_on_a_cpu_and_torch_on_a_gpu(monkeypatch):
    for answer in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda a=answer: a)
        assert native_bf16(torch.device("cpu")) is answer
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda a=answer: a)
        assert native_bf16(torch.device("cuda")) is answer

    def unknown():
        raise RuntimeError("no oneDNN")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", unknown)
    assert native_bf16(torch.device("cpu")) is True  # cannot tell: do as the config asks


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
