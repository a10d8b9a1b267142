"""Checkpoints for exact resume: trainable weights (safetensors), optimizer, scheduler, RNG and data position, and
what they belong to (config, data, base model, trainable shapes), checked before anything is restored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import InstructuneError
from ..io import old_copy, replaced_folder
from ..rundir import differences


def save_checkpoint(folder: Path, named, optimizer, scheduler, state: dict, best_weights: dict | None = None,
                    meta: dict | None = None) -> None:
    """Written into a temporary folder that then replaces `folder` whole; the previous checkpoint is kept as
    `<folder>.old`, so a kill at any point, or a damaged newest checkpoint, leaves a complete one to resume from."""
    from safetensors.torch import save_file

    with replaced_folder(folder, keep_old=True) as tmp:
        save_file({n: p.detach().contiguous() for n, p in named}, str(tmp / "trainable.safetensors"))
        if best_weights is not None:
            save_file({n: w.contiguous() for n, w in best_weights.items()}, str(tmp / "best.safetensors"))
        torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({**(meta or {}), "step": state["step"]}, indent=1, default=str))


def newest_checkpoint(folder: Path | None) -> Path | None:
    """The checkpoint to resume from: `folder`, or `<folder>.old` when a kill came between the two renames."""
    if folder is None:
        return None
    for candidate in (Path(folder), old_copy(folder)):
        if (candidate / "state.pt").is_file():
            return candidate
    return None


def remove_checkpoints(folder: Path) -> None:
    """Once the finished model is saved it replaces them: the checkpoint and the previous one kept beside it."""
    for path in (Path(folder), old_copy(folder)):
        shutil.rmtree(path, ignore_errors=True)


def check_meta(folder: Path, meta: dict) -> None:
    """Refuse to resume a checkpoint that belongs to another training: list every key that differs."""
    try:
        saved = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise damaged(folder, f"meta.json unreadable ({e})") from None
    differ = differences(saved, meta)
    if differ:
        raise InstructuneError("this checkpoint belongs to another training; these differ from it: " + "; ".join(differ)
                               + ". Train from the start (without --resume) or restore the settings", str(folder))


def load_checkpoint(folder: Path, named, optimizer, scheduler) -> tuple[dict, dict | None]:
    """Restore weights, optimizer, scheduler and RNG; returns the saved state and the best weights (if kept).
    A damaged file is named, with the older complete checkpoint offered when there is one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        weights = load_file(str(folder / "trainable.safetensors"))
        state = torch.load(folder / "state.pt", weights_only=True)  # written by instructune; no pickled code runs
        best = load_file(str(folder / "best.safetensors")) if (folder / "best.safetensors").is_file() else None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise damaged(folder, f"{type(e).__name__}: {str(e)[:200]}") from None
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state, best


def damaged(folder: Path, why: str) -> InstructuneError:
    """The error for an unreadable checkpoint (either layout): it names the one that is usable, `<folder>.old` when
    every file of it reads back, or says that none is."""
    old = old_copy(folder)
    if folder == old or not old.is_dir():
        offer = "; there is no older checkpoint: train from the start with --restart"
    elif (fault := unreadable(old)) is None:
        offer = f"; the previous checkpoint {old} reads back whole: delete {folder} and --resume continues from it"
    else:
        offer = f"; the previous checkpoint {old} is damaged too ({fault}): train from the start with --restart"
    return InstructuneError(f"the checkpoint is damaged or truncated ({why}){offer}", str(folder))


def unreadable(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder's files, read without restoring anything (None: nothing): meta.json
    parses, every safetensors header covers its file, every torch file is a whole zip archive (CRCs checked)."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    try:
        json.loads((folder / "meta.json").read_text())
        if not (folder / "state.pt").is_file():
            return "no state.pt"
        for path in sorted(folder.rglob("*")):
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    f.keys()
            elif path.suffix == ".pt":
                with zipfile.ZipFile(path) as z:
                    if z.testzip() is not None:
                        return f"{path.name}: a damaged entry"
    except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as e:
        return f"{type(e).__name__}: {str(e)[:120]}"
    return None
