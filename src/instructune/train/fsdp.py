"""Sharded training on PyTorch FSDP2: the model built on the meta device, sharded and filled shard by shard from its
weight files (no process holds it whole), sharded checkpoints, and the whole model gathered for saving."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, fsdp_clash
from ..errors import InstructuneError
from ..io import replaced_folder
from ..models import quiet_peft, training_model
from ..runtime import check_launcher, device, say, warn
from .checkpoint import damaged


def wanted(cfg: TrainConfig, world: int) -> bool:
    """Whether this training shards: `train.strategy: fsdp`, or an `accelerate launch` with an FSDP config, with
    several processes (one process has nothing to shard it with: it trains the plain model)."""
    return world > 1 and (cfg.strategy == "fsdp" or check_launcher() == "fsdp")


def check_supported(model, cfg: TrainConfig, score_fn) -> None:
    """Refuse, by name, what the sharded path does not do yet. (A shared prompt prefix is computed in the same pass
    as the rows, or not shared: `Plan.two_pass`.)"""
    if clash := fsdp_clash(cfg):
        raise InstructuneError(clash, "train.strategy")
    if score_fn is not None:  # generation stops on each process's own outputs: a differing count of collectives hangs
        raise InstructuneError("train.eval_metric (scoring by generation during training) is not supported with "
                               "train.strategy: fsdp yet; use the validation loss (eval_metric: false) or strategy ddp",
                               "train.strategy")


def shard(model, bf16: bool, world: int):
    """Wrap each decoder layer, then the whole model, with `fully_shard` over a mesh of all processes: each process
    keeps 1/world of every parameter (and so of its gradient and optimizer state), and a layer's full weights exist
    only while it runs. LoRA: the frozen base is sharded the same way; only the adapter has gradients. Under
    `train.bf16`, layers compute in bf16 while the sharded weights and the gradient reduction stay fp32. The mesh is
    on this process's device (`runtime.device`: its GPU, LOCAL_RANK, or the CPU); a model on the meta device stays
    there (`fill` makes its shards). A model already sharded is returned as it is."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    mesh = init_device_mesh(device().type, (world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    layers = decoder_layers(model)
    if not layers:
        warn(f"{type(model).__name__} names no layer class to shard one by one: the whole model is one unit, "
             "gathered whole at each pass")
    for layer in reversed(layers):  # inner units before the ones around them (FSDP2 wraps bottom-up)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    for module in _loose(model, layers) if layers else ():
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if torch.distributed.get_rank() == 0:
        say(f"fsdp: {len(layers)} layers and the rest of the model sharded over {world} processes"
            + (" (bf16 compute, fp32 weights and gradient reduction)" if bf16 else ""))
    return model


def _loose(model, layers: list) -> list:
    """The modules with weights of their own outside the decoder layers, but for the input embeddings and the output
    head (the final norm): units of their own, so that the root unit holds the embeddings and head alone (which
    `release_tied_weights` can free early)."""
    inside = {id(p) for layer in layers for p in layer.parameters()}
    ends = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    return [m for m in model.modules() if (own := list(m.parameters(recurse=False)))
            and not any(id(p) in inside or id(p) in ends for p in own)]


def release_tied_weights(model):
    """Under FSDP, for a model whose head is its input embeddings: a callable that frees the root unit's gathered
    weights (the whole embeddings on every process) once the head's backward has run, for `fused.tied_gradient` to
    call there, where FSDP would free them at the end of backward. Nothing later in backward reads them: the lookup's
    gradient takes only the ids (SmolLM2-135M, fp32: 113 MB less held by each process through backward and at its
    end, where its peak is). None where the model is not sharded, or its root unit holds other weights."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return None
    inner = {id(p) for m in model.modules() if m is not model and isinstance(m, FSDPModule) for p in m.parameters()}
    root = [p for p in model.parameters() if id(p) not in inner]
    lookup, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is lookup.weight
    return model.reshard if tied and len(root) == 1 and root[0] is lookup.weight else None


def sharded_model(source: str, model_cfg: ModelConfig, train_cfg: TrainConfig, world: int):
    """The model to train, without any process holding it whole: built on the meta device and wrapped as one
    process wraps it (`models.training_model`: LoRA with the same seeded adapter, activation checkpointing), sharded,
    then filled (`fill`). DoRA (its magnitudes are norms of the base weights) and an adapter folder as the model are
    loaded whole by each process first, then sharded."""
    if Path(source, "adapter_config.json").is_file() or (train_cfg.method != "full" and train_cfg.lora.variant == "dora"):
        warn("fsdp: each process loads the whole model before sharding it (DoRA, or an adapter folder as the model)")
        return shard(training_model(source, model_cfg, train_cfg), train_cfg.bf16, world)
    model = shard(training_model(source, model_cfg, train_cfg, empty=True), train_cfg.bf16, world)
    fill(model, _weights_folder(source, model_cfg))
    return model


def fill(model, folder: Path) -> None:
    """Give a model sharded on the meta device its weights: each process allocates its shards (`to_empty`) and reads
    into them its own rows of every weight, and nothing else, from the safetensors files in `folder` (`dcp.load` with
    `HuggingFaceStorageReader`: slices of the memory-mapped files, copied into the shards). What the build made real
    is kept: LoRA's adapter (seeded as in one process) and the buffers (the rotary frequencies, in no file).

    Chosen by measurement over process 0 reading each tensor and broadcasting it (`set_model_state_dict`, one
    tensor a call, `broadcast_from_rank0`): SmolLM2-135M (538 MB, fp32), 2 gloo processes on a busy 2-core CPU, each
    process's resident peak grew by 0.64x the model's bytes (its half, and one weight's rows at a time) in 4.3 s
    (1.04x in 2.9 s with each file opened once: `_slice_reader`), against 2.7x in 86 s."""
    import torch.distributed.checkpoint as dcp

    started = time.perf_counter()
    made = {n: _local(t).detach().clone() for n, t in _tensors(model) if not _local(t).is_meta}
    model.to_empty(device=device())
    with torch.no_grad():
        for name, t in _tensors(model):
            if name in made:
                _local(t).copy_(made[name])
    kept = {id(t) for n, t in _tensors(model) if n in made and isinstance(t, torch.nn.Parameter)}
    targets = _file_targets(model, kept, folder)
    dcp.load({key: ts[0] for key, ts in targets.items()}, storage_reader=_slice_reader(str(folder)))
    with torch.no_grad():  # a weight in two places (peft's modules_to_save: the original and the trained copy)
        for ts in targets.values():
            for t in ts[1:]:
                _local(t).copy_(_local(ts[0]))
    if torch.distributed.get_rank() == 0:
        say(f"fsdp: each process read its shards of {len(targets)} weights from {folder} "
            f"({time.perf_counter() - started:.1f} s)")


def _slice_reader(path: str):
    """DCP's `HuggingFaceStorageReader`, each slice read through a file opened for it alone: safetensors maps the
    file, and the pages read stay in this process's resident memory until the file is closed (opened once, a whole
    file's share of this process: as much again as its shards)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.futures import Future

    class SliceReader(HuggingFaceStorageReader):
        def read_data(self, plan, planner):
            from safetensors import safe_open

            for item in plan.items:
                rows = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
                with safe_open(self.storage_data[item.storage_index].relative_path, "pt") as f:
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(f.get_slice(item.storage_index.fqn)[rows])
                planner.commit_tensor(item, target)
            done = Future()
            done.set_result(None)
            return done

    return SliceReader(path)


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this process


def _file_targets(model, kept: set, folder: Path) -> dict[str, list]:
    """The model's tensors to read, by their name in the weight files: every weight but those in `kept` (tied
    weights once), and the persistent buffers the files hold. peft's names lose its wrappers (`base_layer`,
    `original_module`, `modules_to_save.<adapter>`). A weight the files lack is refused by name."""
    from safetensors import safe_open

    names = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            names.update(f.keys())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets, seen = {}, set(kept)
    for name, t in base.state_dict(keep_vars=True).items():
        key = re.sub(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)", "", name)
        if id(t) in seen or (not isinstance(t, torch.nn.Parameter) and key not in names):
            continue
        seen.add(id(t))
        targets.setdefault(key, []).append(t)
    missing = sorted(set(targets) - names)
    if missing:
        raise InstructuneError(f"the weight files hold no {missing[0]!r}" + (f" (nor {len(missing) - 1} more)" if
                               len(missing) > 1 else "") + ", which the model's class has: it cannot be read shard by "
                               "shard; use train.strategy: ddp", f"model.name: {folder}")
    return targets


def _weights_folder(source: str, cfg: ModelConfig) -> Path:
    """The folder of the model's safetensors files: a local model, or a hub id's files in the hub cache."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, revision=cfg.revision, allow_patterns=["*.safetensors", "*.json"]))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers keeps whole when it splits a model
    (`_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _options(loading: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the frozen base is reloaded from its source, not checkpointed, so loading leaves it out (not strict); every
    # trainable key is still required, by `dcp.load`
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def save_sharded(folder: Path, model, optimizer, scheduler, state: dict, best_weights: dict | None = None,
                 meta: dict | None = None) -> None:
    """A checkpoint every process writes its own shards of (`torch.distributed.checkpoint`), atomic and rotated like
    `save_checkpoint`'s: one temporary folder, renamed into place by process 0 once every process has written, the
    previous one kept as `<folder>.old`. Called by every process; the folder must be on a file system all machines
    share."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    weights, optim = get_state_dict(model, optimizer, options=_options())
    content = {"model": weights, "optimizer": optim, **({"best": best_weights} if best_weights is not None else {})}
    with _shared_folder(Path(folder), rank) as tmp:
        dcp.save(content, checkpoint_id=tmp)
        torch.save(torch.get_rng_state(), tmp / f"rng-{rank}.pt")  # each process's own (dropout masks differ)
        if rank == 0:
            torch.save({**state, "scheduler": scheduler.state_dict(), "best_saved": best_weights is not None},
                       tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({**(meta or {}), "step": state["step"]}, indent=1, default=str))


@contextlib.contextmanager
def _shared_folder(folder: Path, rank: int):
    """Process 0 makes the temporary folder and tells the others its name; after every process has written into it
    (a barrier), process 0 renames it into place (`replaced_folder`), and no process goes on before it is there."""
    import torch.distributed as dist

    if rank == 0:
        with replaced_folder(folder, keep_old=True) as tmp:
            dist.broadcast_object_list([str(tmp)], src=0)
            yield tmp
            dist.barrier()
        dist.barrier()
        return
    name = [None]
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    if not tmp.is_dir():
        raise InstructuneError(f"process {rank} cannot see the checkpoint folder process 0 made ({tmp}): with "
                               "train.strategy: fsdp on several machines, output_dir must be on a file system every "
                               "machine shares", "output_dir")
    yield tmp
    dist.barrier()
    dist.barrier()


def load_sharded(folder: Path, model, optimizer, scheduler, named) -> tuple[dict, dict | None]:
    """Restore this process's shards of the weights and optimizer state, the scheduler and this process's RNG from
    a `save_sharded` checkpoint; returns the saved state and the best weights' shards (if kept)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    try:
        state = torch.load(folder / "state.pt", weights_only=True)  # written by instructune; no pickled code runs
        weights, optim = get_state_dict(model, optimizer, options=_options())
        content = {"model": weights, "optimizer": optim}
        if state.get("best_saved"):
            content["best"] = {n: torch.empty_like(p) for n, p in named}
        dcp.load(content, checkpoint_id=folder)  # into the shards given: each process reads only its own
        rng = torch.load(folder / f"rng-{dist.get_rank()}.pt", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
        raise damaged(folder, f"{type(e).__name__}: {str(e)[:200]}") from None
    set_state_dict(model, optimizer, model_state_dict=content["model"], optim_state_dict=content["optimizer"],
                   options=_options(loading=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng)
    return state, content.get("best")


def gathered(model):
    """The trained model whole, for saving as a standard folder: every process takes part in the gather; process 0
    gets a plain (unsharded) copy of the model holding the full weights on the CPU, the others None. A model that
    was not sharded is returned as it is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() > 0:
        return None
    return _plain_copy(model, full)


def _plain_copy(model, full: dict):
    """A model of the same (unwrapped) class, built without allocating weights, that takes `full` as its tensors."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: the gathered tensors become them (assign)
        if hasattr(model, "get_base_model"):  # PEFT: the same adapter over an empty base
            from peft import get_peft_model

            base = model.get_base_model()
            with quiet_peft():
                plain = get_peft_model(_unsharded_class(base)(base.config), model.peft_config[model.active_adapter])
        else:
            plain = _unsharded_class(model)(model.config)
    plain.load_state_dict(full, assign=True)
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.eval()


def _unsharded_class(module) -> type:
    """The class `fully_shard` swapped out (it makes `FSDP<Class>` with `FSDPModule` in front of the original)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
