"""How training is run, chosen once: the strategy for one process, DDP and FSDP (`train/strategy.py`), the optimizer
and learning-rate schedules named in the config (`train/optim.py`), and the checkpoints removed after the save."""

import math

import pytest
import torch
from pydantic import ValidationError

from conftest import tiny_config, write_config
from instructune.config import TrainConfig, load_config
from instructune.errors import InstructuneError
from instructune.io import old_copy, replaced_folder
from instructune.train.checkpoint import newest_checkpoint, remove_checkpoints
from instructune.train.optim import OPTIMIZERS, SCHEDULES, clip_gradients, lr_factor, make_optimizer
from instructune.train.strategy import DDP, FSDP, Single, prefix_pass, strategy_for


def _lrs(scheduler: str, total: int = 10, warmup_ratio: float = 0.2, lr: float = 0.1) -> list[float]:
    """The learning rate each of `total` optimizer steps (0-based) trains with."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer, schedule = make_optimizer([param], TrainConfig(lr=lr, warmup_ratio=warmup_ratio, scheduler=scheduler),
                                         total, torch.device("cpu"))
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.zeros(3)
        optimizer.step()
        schedule.step()
    return rates


# 10 steps, warm-up int(10 * 0.2) = 2 steps: 1/3 and 2/3 of the peak, then the peak at step 2
@pytest.mark.parametrize("name, expected", [
    ("linear", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 7 / 8, 6: 4 / 8, 9: 1 / 8}),  # (10 - s) / 8: zero just after the last
    ("cosine", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5,
                9: 0.5 * (1 + math.cos(7 * math.pi / 8))}),
    ("constant", {0: 1 / 3, 1: 2 / 3, 2: 1.0, 5: 1.0, 9: 1.0}),
])
def test_each_schedule_warms_up_then_follows_its_curve(name, expected):
    rates = _lrs(name)
    for step, share in expected.items():
        assert rates[step] == pytest.approx(0.1 * share, rel=1e-12), (name, step)
    assert max(rates) == pytest.approx(0.1)
    if name != "constant":  # decaying from step 2 on
        assert all(a > b for a, b in zip(rates[2:], rates[3:]))


def test_cosine_values_by_hand():
    assert lr_factor("cosine", 4, 10, 2) == pytest.approx(0.8535533905932737)
    assert lr_factor("cosine", 9, 10, 2) == pytest.approx(0.03806023374435663)
    assert lr_factor("cosine", 10, 10, 2) == pytest.approx(0.0)
    assert lr_factor("cosine", 0, 10, 0) == 1.0  # no warm-up: the peak at once


def test_the_default_linear_schedule_is_bit_identical_to_the_earlier_formula():
    def earlier(s, total, warmup):  # the loop's schedule before train.scheduler existed
        return (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))

    assert TrainConfig().scheduler == "linear" and TrainConfig().optimizer == "adamw"
    for total in (1, 2, 5, 7, 40, 333):
        for ratio in (0.0, 0.05, 0.1, 0.5, 0.99):
            warmup = int(total * ratio)
            assert [lr_factor("linear", s, total, warmup) for s in range(total + 1)] == \
                [earlier(s, total, warmup) for s in range(total + 1)]


def test_the_optimizer_is_fused_adamw_with_the_configured_decay():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer, _ = make_optimizer([param], TrainConfig(lr=0.01, weight_decay=0.1), 5, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.1


def _params(*grads):
    out = []
    for g in grads:
        out.append(torch.nn.Parameter(torch.zeros_like(g)))
        out[-1].grad = g.clone()
    return out


@pytest.mark.parametrize("scale", [0.001, 1.0, 40.0])
def test_the_clipping_norm_is_the_same_bit_for_bit_wherever_the_gradients_are_cut(scale):
    """FSDP holds each gradient cut in two: the norm (and so each clipped gradient) must not depend on the cut,
    or the update differs from one process's in its last bits and Adam carries it on (torch's fp32 norm does)."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g) * scale for n in (2_500_003, 4_097, 1)]
    for cut in (1, 1_000_000, 1_250_001, 2_499_999):  # the first gradient cut where two processes would hold it
        whole, pieces = _params(*grads), _params(grads[0][:cut], grads[0][cut:], *grads[1:])
        assert clip_gradients(whole, 1.0) == clip_gradients(pieces, 1.0)
        assert torch.equal(whole[0].grad, torch.cat([pieces[0].grad, pieces[1].grad]))
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(whole[1:], pieces[2:]))
    exact = math.sqrt(sum(float((t.double() ** 2).sum()) for t in grads))
    clipped = _params(*grads)
    norm = clip_gradients(clipped, 1.0)
    assert norm == pytest.approx(exact, rel=1e-7)  # fp64 sums: within the fp32 rounding of the exact norm
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in clipped))
    assert after == pytest.approx(min(exact, 1.0), rel=1e-5)  # clipped to 1, or left as it was
    if exact < 1.0:
        assert all(torch.equal(p.grad, t) for p, t in zip(clipped, grads))


def test_a_non_finite_gradient_norm_is_returned_and_the_gradients_left_as_they_are():
    grads = [torch.tensor([1.0, float("inf")]), torch.tensor([float("nan")])]
    params = _params(*grads)
    assert not math.isfinite(clip_gradients(params, 1.0))
    assert torch.equal(params[0].grad, grads[0]) and params[1].grad.isnan().all()
    assert clip_gradients([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0.0  # no gradient yet


def test_the_config_accepts_exactly_the_tables_names():
    for key, table in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULES)):
        accepted = TrainConfig.model_fields[key].annotation.__args__
        assert set(accepted) == set(table), key
        assert TrainConfig.model_fields[key].description  # documented like the other train keys


@pytest.mark.parametrize("key, bad", [("optimizer", "sgd"), ("scheduler", "step"), ("scheduler", "Linear")])
def test_an_unknown_optimizer_or_scheduler_is_refused_naming_the_key(tmp_path, tiny_model, key, bad):
    with pytest.raises(ValidationError) as e:
        TrainConfig(**{key: bad})
    assert e.value.errors()[0]["loc"] == (key,)
    config = write_config(tmp_path, tiny_config(tmp_path, tiny_model))
    with pytest.raises(InstructuneError) as e:
        load_config(config, [f"train.{key}={bad}"])
    assert f"(train.{key})" in e.value.where and repr(bad) in str(e.value)


def test_one_process_trains_the_model_as_it_is():
    for cfg in (TrainConfig(), TrainConfig(strategy="fsdp")):  # one process has nothing to shard with
        strategy = strategy_for(cfg, 1, None, None)
        assert type(strategy) is Single
    model = torch.nn.Linear(2, 2)
    assert strategy.wrap(model) is model and strategy.gather(model) is model
    assert strategy.plan_name == "ddp" and prefix_pass(strategy.plan_name, 1, False) and strategy.meta == {}
    assert strategy.writes(0) and not strategy.writes(1)
    with strategy.no_sync():
        pass


def test_several_processes_replicate_under_ddp_and_shard_under_fsdp(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    ddp = strategy_for(TrainConfig(), 2, None, None)
    assert type(ddp) is DDP and ddp.plan_name == "ddp" and prefix_pass(ddp.plan_name, 2, False) and ddp.meta == {}
    assert ddp.writes(0) and not ddp.writes(1)  # every replica holds the same weights: process 0 writes
    sharded = strategy_for(TrainConfig(strategy="fsdp", bf16=True), 4, None, None)
    assert type(sharded) is FSDP and (sharded.bf16, sharded.world) == (True, 4)
    assert sharded.plan_name == "fsdp" and not prefix_pass(sharded.plan_name, 4, False)
    assert sharded.meta == {"strategy": "fsdp"}
    assert not prefix_pass("ddp", 1, True) and prefix_pass("fsdp", 1, False)  # checkpointing; one process: no shards
    assert sharded.writes(0) and sharded.writes(3)  # each process writes its own shards
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch --use_fsdp`: the config need not say
    assert type(strategy_for(TrainConfig(), 2, None, None)) is FSDP


def test_fsdp_refuses_what_it_cannot_do_when_chosen():
    with pytest.raises(InstructuneError, match="eval_metric") as e:
        strategy_for(TrainConfig(strategy="fsdp", eval_metric=True), 2, None, lambda m: 0.0)
    assert e.value.where == "train.strategy"
    assert type(strategy_for(TrainConfig(eval_metric=True), 2, None, lambda m: 0.0)) is DDP


def test_the_checkpoint_and_its_previous_copy_are_removed_after_the_save(tmp_path):
    folder = tmp_path / "checkpoint"
    for step in (1, 2):  # the second save keeps the first as the previous copy
        with replaced_folder(folder, keep_old=True) as tmp:
            (tmp / "state.pt").write_text(str(step))
    assert old_copy(folder) == tmp_path / "checkpoint.old" and old_copy(folder).is_dir()
    assert newest_checkpoint(folder) == folder
    remove_checkpoints(folder)
    assert not folder.exists() and not old_copy(folder).exists() and newest_checkpoint(folder) is None
    remove_checkpoints(folder)  # nothing left: nothing to do


@pytest.mark.parametrize("accum", [1, 2])
def test_processes_share_the_very_micro_batches_one_process_accumulates(accum):
    """A step's micro-batches do not depend on the process count: 2 processes x `accum` take exactly the passes one
    process takes with 2 x `accum` accumulated (so their gradients differ only by the order the halves are summed:
    DDP x 2 gave losses bit-identical to one process in benchmarks/memory_scaling.py), a short last step included."""
    from instructune.prompts.format import IGNORE, Encoded
    from instructune.train.loop import Plan

    g = torch.Generator().manual_seed(0)
    examples = [Encoded(ids := torch.randint(3, 300, (int(n),), generator=g).tolist(), [IGNORE] * (len(ids) - 2) + ids[-2:])
                for n in torch.randint(5, 40, (37,), generator=g)]

    def passes(world: int, rank: int, grad_accum: int) -> list[list[list[int]]]:
        plan = Plan(examples, TrainConfig(batch_size=4, grad_accum=grad_accum, epochs=1), 0, 0, world, None, False)
        return [[b["input_ids"].tolist() for b in plan.passes(group, rank, torch.device("cpu"))[0]]
                for group in plan.groups(0)]

    one = passes(1, 0, 2 * accum)
    shared = [passes(2, rank, accum) for rank in (0, 1)]
    assert len(one) == len(shared[0]) == len(shared[1]) == math.ceil(37 / (8 * accum))
    for step, mine in enumerate(one):
        assert sorted(mine) == sorted(shared[0][step] + shared[1][step]), step
