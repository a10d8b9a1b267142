"""Sharded training (`train.strategy: fsdp`, PyTorch FSDP2) with 2 processes on a CPU (gloo): the same losses and
model as one process, half of the weights and optimizer state in each process, exact resume after kill -9, LoRA from
an `accelerate launch` FSDP config, and two simulated nodes on the loopback address."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import LOSS_RTOL, WEIGHT_RTOL, loss_gap, processes_with_a_gpu_each, tiny_config, weights_gap, write_config
from instructune.config import TrainConfig
from instructune.errors import InstructuneError

pytestmark = processes_with_a_gpu_each(2)
STEPS = 5  # 2 tasks × 20 training examples, a global batch of 8, one epoch
CLI = ["-m", "instructune.cli", "train"]
# a checkpoint every step; the kill test holds after the checkpoint of step HOLD is written, until killed
HOLD = 3
WRAPPER = """
import os, pathlib, sys, time
import instructune.train.fsdp as fsdp
markers, _real = pathlib.Path(sys.argv[1]), fsdp.save_sharded
def patched(*a, **k):
    _real(*a, **k)
    if a[4]["step"] == {hold}:
        (markers / f"rank{{os.environ['RANK']}}").write_text(str(os.getpid()))
        time.sleep(3600)
fsdp.save_sharded = patched
from instructune.cli import main
sys.argv = ["instructune", *sys.argv[2:]]
main()
"""


def _env() -> dict:
    return {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def _config(root: Path, model: Path, name: str, batch: int, **train) -> Path:
    cfg = tiny_config(root / name, model, ("classification", "qa"), n_train=20, epochs=1, batch_size=batch,
                      eval_every=2, **train)
    return write_config(root, cfg, f"{name}.yaml")


def _run(command: list[str]) -> str:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def _log(config: Path) -> list[dict]:
    run = config.parent / config.stem / "run"
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _run_dir(config: Path) -> Path:
    return config.parent / config.stem / "run"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FULL = dict(method="full", lr=1e-3, save_every=1)  # save_every: the checkpoints are written (and their cost) too


def _one_process(config: Path) -> None:
    """The reference: one process, in this one (its imports are paid already)."""
    from typer.testing import CliRunner

    from instructune.cli import app

    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output[-3000:]


def _two_nodes(config: Path) -> str:
    """Two simulated machines on the loopback address: two torchrun launches of one process each, meeting at a
    c10d rendezvous, as `torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:PORT` on two real ones."""
    port = _free_port()
    nodes = [subprocess.Popen(_torchrun("--nnodes", 2, "--node_rank", rank, "--nproc_per_node", 1, "--rdzv_backend",
                                        "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "fsdp-test",
                                        "--local_addr", "127.0.0.1", *CLI, config),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, (out + err)[-3000:]
    return "".join(out for out, _ in outs)


@pytest.fixture(scope="module")
def full_runs(tiny_model, tmp_path_factory):
    """Full fine-tuning: one process with a batch of 8, and 2 FSDP processes × 4 on two simulated nodes."""
    root = tmp_path_factory.mktemp("fsdp-full")
    one = _config(root, tiny_model, "one", 8, **FULL)
    two = _config(root, tiny_model, "two", 4, strategy="fsdp", **FULL)
    _one_process(one)
    out = _two_nodes(two)
    return SimpleNamespace(root=root, one=one, two=two, out=out, model=tiny_model)


def test_full_finetuning_on_two_simulated_nodes_equals_one_process_and_saves_a_plain_model(full_runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one, two = _log(full_runs.one), _log(full_runs.two)
    assert "fsdp: 2 layers and the rest of the model sharded over 2 processes" in full_runs.out
    assert "fsdp: each process read its shards of" in full_runs.out  # built on the meta device, never whole
    assert len(one) == len(two) == STEPS and one[-1]["loss"] < one[0]["loss"] - 0.01  # it trained
    assert loss_gap(one, two) < LOSS_RTOL and loss_gap(one, two, "val_loss") < LOSS_RTOL
    assert [e["tokens"] for e in one] == [e["tokens"] for e in two]
    # the gathered model: one standard safetensors folder, the single process's weights, loadable with no instructune
    model_dir = _run_dir(full_runs.two) / "model"
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    a = AutoModelForCausalLM.from_pretrained(_run_dir(full_runs.one) / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    base = AutoModelForCausalLM.from_pretrained(full_runs.model).state_dict()
    assert a.keys() == b.keys()
    assert weights_gap(a, b, base) < WEIGHT_RTOL
    assert max((base[k] - b[k]).abs().max().item() for k in a) > 1e-3
    files = [load_file(str(_run_dir(c) / "model" / "model.safetensors")) for c in (full_runs.one, full_runs.two)]
    assert files[0].keys() == files[1].keys()  # the same tensors saved (tied weights once)
    assert not (_run_dir(full_runs.two) / "checkpoint").exists()  # removed once the model is saved


def test_kill_9_mid_training_then_resume_gives_bit_identical_losses(full_runs):
    root = full_runs.root
    config = _config(root, full_runs.model, "cut", 4, strategy="fsdp", **FULL)
    markers = root / "held"
    markers.mkdir()
    (root / "wrapper.py").write_text(WRAPPER.format(hold=HOLD))
    proc = subprocess.Popen(_torchrun("--standalone", "--nproc_per_node", 2, root / "wrapper.py", markers, "train",
                                      config), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(list(markers.iterdir())) < 2:  # both processes have written the checkpoint of step HOLD
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached step {HOLD}: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.1)
    time.sleep(0.2)  # a marker's text is written after its file appears
    for marker in markers.iterdir():  # kill -9 both workers, then their launcher
        os.kill(int(marker.read_text()), signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = _run_dir(config)
    assert len(_log(config)) == HOLD and not (run / "model").exists()
    checkpoint = run / "checkpoint"
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == HOLD
    assert json.loads((run / "checkpoint.old" / "meta.json").read_text())["step"] == HOLD - 1  # rotated
    shards = sorted(p.name for p in checkpoint.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shards
    assert sorted(p.name for p in checkpoint.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    sizes = [(checkpoint / s).stat().st_size for s in shards]
    assert min(sizes) > 0.8 * max(sizes)  # about half of the weights and optimizer state each

    _run(_torchrun("--standalone", "--nproc_per_node", 2, *CLI, config, "--resume"))
    # the uninterrupted run is the two-node one: 2 processes either way, and gloo reduces in rank order alone
    resumed, whole = _log(config), _log(full_runs.two)
    assert [e["step"] for e in resumed] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in resumed] == [e["loss"] for e in whole]  # bit-identical, step for step
    assert [e.get("val_loss") for e in resumed] == [e.get("val_loss") for e in whole]


def _initial_adapter(config: Path) -> dict:
    """The adapter a run of `config` starts from (the same seed and wrapping as `run_train`), keyed as saved."""
    import yaml
    from peft import get_peft_model_state_dict

    from instructune.config import ExperimentConfig
    from instructune.models import training_model
    from instructune.tasks import prepare

    prep = prepare(ExperimentConfig.model_validate(yaml.safe_load(config.read_text())))
    torch.manual_seed(prep.cfg.seed)
    model = training_model(prep.model_source, prep.cfg.model, prep.cfg.train)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_lora_from_an_accelerate_fsdp_launch_equals_one_process(tmp_path, tiny_model):
    """`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP: the config says nothing of a strategy, and the run
    still takes the FSDP path (the frozen base sharded, the adapter trained)."""
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    lora = dict(method="lora", lora={"dropout": 0.0}, lr=1e-2)
    one, two = _config(tmp_path, tiny_model, "one", 8, **lora), _config(tmp_path, tiny_model, "two", 4, **lora)
    _one_process(one)
    out = _run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
                "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
                "--dynamo_backend", "no", *CLI, str(two)])
    assert "sharded over 2 processes" in out
    a, b = _log(one), _log(two)
    assert len(a) == STEPS and loss_gap(a, b) < LOSS_RTOL and loss_gap(a, b, "val_loss") < LOSS_RTOL
    adapter_a = load_file(str(_run_dir(one) / "model" / "adapter_model.safetensors"))
    adapter_b = load_file(str(_run_dir(two) / "model" / "adapter_model.safetensors"))
    assert adapter_a.keys() == adapter_b.keys() and adapter_b
    assert weights_gap(adapter_a, adapter_b, _initial_adapter(one)) < WEIGHT_RTOL
    loaded = AutoPeftModelForCausalLM.from_pretrained(_run_dir(two) / "model")  # plain peft, no instructune code
    mine = {n: p for n, p in loaded.named_parameters() if "lora_B" in n}
    assert mine and all(p.abs().max() > 0 for p in mine.values())  # lora_B starts at zero: it was trained


def _shard_worker(rank: int, model_dir: str, store: str, out: str, gemma_dir: str, wide_dir: str) -> None:
    """One of 2 processes: shard the tiny model, take one AdamW step, record the local sizes, gather the model; then
    build models shard by shard (`_sharded_loading`)."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    from instructune.train import fsdp
    from instructune.train.fused import tied_gradient

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        reference = copy.deepcopy(model)  # the same step unsharded
        full = {n: p.numel() for n, p in model.named_parameters()}
        fsdp.shard(model, False, 2)
        local = {n: p.to_local().numel() for n, p in model.named_parameters()}
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        release, released = fsdp.release_tied_weights(model), []

        def after_head():  # the root unit's gathered embeddings freed (the sharded ones registered again) mid-backward
            release()
            released.append(isinstance(model.get_input_embeddings().weight, torch.distributed.tensor.DTensor))

        for m in (model, reference):
            optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
            with tied_gradient(m, after_head if m is model else None) as tied:
                assert tied
                m(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            if m is model:
                state = sum(t.to_local().numel() for s in optimizer.state.values() for k, t in s.items() if k != "step")
        plain = fsdp.gathered(model)
        result = {"full": full, "local": local, "state": state, "released": released,
                  "wrapped": sum(isinstance(m, FSDPModule) for m in model.modules())}
        if rank == 0:
            ref = reference.state_dict()
            result.update(cls=type(plain).__name__, tied=plain.lm_head.weight is plain.model.embed_tokens.weight,
                          gap=weights_gap(plain.state_dict(), ref, start := AutoModelForCausalLM.from_pretrained(
                              model_dir).state_dict()),
                          moved=max((plain.state_dict()[k] - v).abs().max().item() for k, v in start.items()))
        else:
            result["plain"] = plain
        result["lora_resumed"] = _lora_round_trip(model_dir, Path(out, "lora-checkpoint"))
        result.update(_sharded_loading(model_dir, gemma_dir, wide_dir))
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _lora_round_trip(model_dir: str, folder: Path) -> bool:
    """A sharded LoRA model after one step, checkpointed (`save_sharded`) and loaded into a fresh one (`load_sharded`):
    whether the next step leaves both with the same adapter shards (weights and AdamW moments restored)."""
    from transformers import AutoModelForCausalLM

    from instructune.config import LoraConfig
    from instructune.models import wrap_lora
    from instructune.train import fsdp
    from instructune.train.loop import make_optimizer

    ids, models = torch.tensor([[5, 6, 7, 8, 9, 10]]), []
    for _ in range(2):
        torch.manual_seed(0)
        model = fsdp.shard(wrap_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig()), False, 2)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        models.append((model, named, *make_optimizer([p for _, p in named], TrainConfig(lr=0.1), 10, ids.device)))

    def step(model, named, optimizer, scheduler):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    step(*models[0])
    fsdp.save_sharded(folder, models[0][0], *models[0][2:], {"step": 1}, None, {})
    fsdp.load_sharded(folder, models[1][0], *models[1][2:], models[1][1])
    for m in models:
        step(*m)
    return all(torch.equal(a.to_local(), b.to_local()) for (_, a), (_, b) in zip(models[0][1], models[1][1]))


def _sharded_loading(model_dir: str, gemma_dir: str, wide_dir: str) -> dict:
    """`fsdp.sharded_model` in this process (built on the meta device, sharded, each process reading its own rows):
    whether its shards, buffers (rotary frequencies), tied embeddings, frozen/trained split and LoRA adapter equal
    the whole load's, sharded (same seed); and by how much this process's resident peak (VmHWM) grows while it
    builds a wider model, as a share of that model's bytes, beside loading it whole and sharding it."""
    from instructune.config import LoraConfig, ModelConfig
    from instructune.models import training_model
    from instructune.train import fsdp, memory

    def whole(source, model_cfg, train_cfg, world):
        return fsdp.shard(training_model(source, model_cfg, train_cfg), False, world)

    same = {}
    for name, source, cfg in (("full", model_dir, TrainConfig(method="full")), ("gemma", gemma_dir, TrainConfig(
            method="full")), ("lora", model_dir, TrainConfig(lora=LoraConfig(dropout=0.0), gradient_checkpointing=True))):
        built = []
        for load in (fsdp.sharded_model, whole):
            torch.manual_seed(0)
            model = load(source, ModelConfig(name=source), cfg, 2)
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            built.append(({n: (t.to_local() if hasattr(t, "to_local") else t, t.requires_grad)
                           for n, t in [*model.named_parameters(), *model.named_buffers()]},
                          base.lm_head.weight is base.model.embed_tokens.weight))
        (a, tied), (b, _) = built
        same[name] = tied and a.keys() == b.keys() and all(torch.equal(t, b[n][0]) and g == b[n][1]
                                                            for n, (t, g) in a.items())
    size, held = Path(wide_dir, "model.safetensors").stat().st_size, {}
    for how, load in (("sharded", fsdp.sharded_model), ("whole", whole)):
        memory.reset_peak(torch.device("cpu"))
        before = _resident("VmRSS")
        model = load(wide_dir, ModelConfig(name=wide_dir), TrainConfig(method="full"), 2)
        held[how] = (_resident("VmHWM") - before) / size
        del model
    return {"same": same, "held": held}


def _resident(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _wide_model(path: Path) -> Path:
    """An 86 MB Llama (6 layers of 512 x 1536, no weight over 3 % of the model), written as zeros: big enough that a
    process's resident memory measures what loading it holds."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    cfg.save_pretrained(path)
    with init_empty_weights():
        names = {n: p.shape for n, p in LlamaForCausalLM(cfg).named_parameters()}
    save_file({n: torch.zeros(shape) for n, shape in names.items()}, str(path / "model.safetensors"))
    return path


def test_each_process_holds_half_of_the_weights_and_optimizer_state(tmp_path, tiny_model, tiny_gemma):
    """...and, built shard by shard (`train.strategy: fsdp`), the same model as loaded whole, with no process ever
    holding more than 60 % of the model's bytes while it loads (its half, and one weight's rows at a time)."""
    import torch.multiprocessing as mp

    wide = _wide_model(tmp_path / "wide")
    mp.spawn(_shard_worker, args=(str(tiny_model), str(tmp_path / "store"), str(tmp_path), str(tiny_gemma), str(wide)),
             nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    full = ranks[0]["full"]
    total = sum(full.values())
    assert all(r["wrapped"] == 4 for r in ranks)  # 2 decoder layers, the final norm, then the root
    # the tied embeddings' gradient built in one tensor, their gathered copy freed once the head's backward ran
    assert all(r["released"] == [True] for r in ranks)
    for name, n in full.items():  # every parameter split in two (by rows), none kept whole
        assert sum(r["local"][name] for r in ranks) == n and max(r["local"][name] for r in ranks) < n
    for r in ranks:
        assert 0.45 * total < sum(r["local"].values()) < 0.55 * total
        assert 0.45 * 2 * total < r["state"] < 0.55 * 2 * total  # AdamW's two moments of this process's half
    # gathered: process 0 gets a plain model (tied weights kept) equal to the unsharded step; the others nothing
    assert ranks[0]["cls"] == "LlamaForCausalLM" and ranks[0]["tied"] and ranks[1]["plain"] is None
    assert ranks[0]["gap"] < WEIGHT_RTOL and ranks[0]["moved"] > 1e-3
    assert all(r["lora_resumed"] for r in ranks)  # a sharded LoRA checkpoint restores weights and optimizer state
    for r in ranks:  # sharded loading: what each process builds equals the whole load, sharded
        assert r["same"] == {"full": True, "gemma": True, "lora": True}
        assert r["held"]["sharded"] < 0.6, r["held"]  # each process its half and one weight's rows in transit
        assert r["held"]["whole"] > 0.9, r["held"]  # the measure sees a whole model where one is loaded


def test_what_fsdp_cannot_do_yet_is_refused_by_name(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    from instructune.train import fsdp

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    fsdp.check_supported(model, TrainConfig(strategy="fsdp"), None)
    with pytest.raises(InstructuneError, match="eval_metric") as e:
        fsdp.check_supported(model, TrainConfig(strategy="fsdp", eval_metric=True), lambda m: 0.0)
    assert e.value.where == "train.strategy"
    # which runs shard: fsdp asked for (in the config or by an accelerate FSDP launch), with several processes
    assert fsdp.wanted(TrainConfig(strategy="fsdp"), 2) and not fsdp.wanted(TrainConfig(strategy="fsdp"), 1)
    assert not fsdp.wanted(TrainConfig(), 2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp.wanted(TrainConfig(), 2)


def test_a_long_shared_prefix_under_fsdp_equals_one_process(tmp_path, tiny_model):
    """A system prompt long enough that one process computes the shared prefix as a pass of its own (past the fused
    row's FUSED_MAX): FSDP, which gathers a layer's weights only for gradients through the layer's output, computes
    it in one fused row (up to FUSED_ALONE_MAX) or within the rows instead, and gives the same losses (the two-pass
    prefix there fails in backward)."""
    system = " ".join(["Answer with one of the four categories and nothing else."] * 8)
    configs = []
    for name, batch, extra in (("one", 8, {}), ("two", 4, {"strategy": "fsdp"})):
        cfg = tiny_config(tmp_path / name, tiny_model, ("classification",), n_train=16, epochs=1, batch_size=batch,
                          method="full", lr=1e-3, max_length=1024, pass_tokens=0, **extra)
        cfg["tasks"][0]["system_prompt"] = system
        configs.append(write_config(tmp_path, cfg, f"{name}.yaml"))
    _one_process(configs[0])
    _run(_torchrun("--nproc_per_node", 2, "--master_port", _free_port(), *CLI, configs[1]))
    one, two = _log(configs[0]), _log(configs[1])
    assert len(one) == len(two) == 2 and loss_gap(one, two) < LOSS_RTOL
    # whether FSDP's backward survives a two-pass prefix depends on autograd's order (SmolLM2-135M's did not, in
    # benchmarks/memory_scaling.py), so the layout is checked too: one process computes the prefix as a pass of its
    # own here (8 rows past FUSED_MAX), and no batch of the sharded plan does
    from instructune.config import ExperimentConfig
    from instructune.tasks import prepare
    from instructune.train.loop import Plan

    import yaml

    prep = prepare(ExperimentConfig.model_validate(yaml.safe_load(configs[1].read_text())))
    examples = prep.tasks[0].encoded("train", 1024)
    for two_pass, expected in ((True, True), (False, False)):
        plan = Plan(examples, prep.cfg.train, prep.tokenizer.pad_token_id, 0, 1, None, True, two_pass)
        batches = [b for group in plan.groups(0) for b in plan.passes(group, 0, torch.device("cpu"))[0]]
        assert any("prefix_ids" in b for b in batches) == expected
